"""Segmentation metrics accumulated over a dataset: confusion-matrix IoU, pixel accuracy and
a boundary F-score.

Everything is kept as integer counts (a (K, K) confusion matrix and (4, K) boundary counts)
on the device of the predictions, so the result over a dataset is exact, independent of
batching, and a distributed evaluation sums the counts with one ``all_reduce``.

Conventions (so that results are JSON-able and never NaN):

- ``per_class_iou[k] = TP / (TP + FP + FN)`` over valid pixels (target not ``ignore_index``);
  ``None`` for a class absent from both prediction and target (its IoU is 0/0), and such
  classes are excluded from ``miou``. A class predicted but absent from the target has IoU 0.
- ``pixel_acc`` = correct valid pixels / valid pixels.
- With no valid pixel at all every number is 0.0 and every per-class entry ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """(B, H, W) bool -> (B, H, W) bool: pixels within Chebyshev distance ``radius``.

    A separable square dilation by shifted ORs: on CPU ~50x cheaper than a float max-pool.
    """
    if radius <= 0:
        return mask
    rows = mask.clone()
    for d in range(1, radius + 1):
        rows[..., d:, :] |= mask[..., :-d, :]
        rows[..., :-d, :] |= mask[..., d:, :]
    out = rows.clone()
    for d in range(1, radius + 1):
        out[..., :, d:] |= rows[..., :, :-d]
        out[..., :, :-d] |= rows[..., :, d:]
    return out


# Half of the 8-neighbourhood; each pair of pixels is compared once and both ends marked.
_OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _pair_slices(h: int, w: int, dy: int, dx: int) -> tuple[tuple[slice, slice], ...]:
    """Slices (a, b) such that ``x[..., b]`` is ``x[..., a]`` moved by (dy, dx), dy >= 0."""
    rows_a, rows_b = slice(0, h - dy), slice(dy, h)
    if dx >= 0:
        return (rows_a, slice(0, w - dx)), (rows_b, slice(dx, w))
    return (rows_a, slice(-dx, w)), (rows_b, slice(0, w + dx))


def boundary_map(labels: Tensor, valid: Tensor) -> Tensor:
    """(B, H, W) bool: valid pixels with a *valid* 3x3 neighbour of another class.

    Invalid pixels neither are boundaries nor make their neighbours boundaries; the frame
    edge is no boundary.
    """
    h, w = labels.shape[-2:]
    out = torch.zeros_like(valid)
    for dy, dx in _OFFSETS:
        (ra, ca), (rb, cb) = _pair_slices(h, w, dy, dx)
        diff = (valid[..., ra, ca] & valid[..., rb, cb]
                & (labels[..., ra, ca] != labels[..., rb, cb]))
        out[..., ra, ca] |= diff
        out[..., rb, cb] |= diff
    return out


class SegmentationMetrics:
    """Accumulates confusion and boundary counts; ``compute()`` turns them into metrics.

    Boundary F-score (``boundary_f``), exactly:

    1. Valid pixels are those whose target is not ``ignore_index``. Boundary pixels of a
       label map (target, or prediction restricted to valid pixels) are the valid pixels
       having a valid 3x3 neighbour of another class (:func:`boundary_map`). ``Bp_k``,
       ``Bt_k``: the boundary pixels of class k in prediction and target.
    2. A pixel is *within tolerance* of a set if some pixel of the set is at Chebyshev
       distance <= ``boundary_tolerance`` (a square max-pool dilation of the set).
    3. Per class, summed over all images: ``P_k = |Bp_k within tol of Bt_k| / |Bp_k|``,
       ``R_k = |Bt_k within tol of Bp_k| / |Bt_k|`` (0 when the denominator is 0),
       ``F_k = 2 P_k R_k / (P_k + R_k)`` (0 when both are 0).
    4. ``boundary_f`` = mean of ``F_k`` over classes with ``|Bp_k| + |Bt_k| > 0``; 1.0 when
       there are valid pixels but no boundary anywhere (nothing to find, nothing wrongly
       found), 0.0 when there are no valid pixels.

    Counting over the dataset before dividing (rather than averaging per-image F) weighs
    every boundary pixel equally and makes the result independent of batching.
    """

    def __init__(self, num_classes: int, ignore_index: int, boundary_tolerance: int = 2,
                 device: torch.device | str = "cpu") -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if boundary_tolerance < 0:
            raise ValueError("boundary_tolerance must be >= 0")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.tolerance = boundary_tolerance
        k = num_classes
        self.confusion = torch.zeros(k, k, dtype=torch.int64, device=device)  # [target, pred]
        # rows: pred boundary px, pred px matched, target boundary px, target px matched
        self.boundary = torch.zeros(4, k, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.confusion.zero_()
        self.boundary.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` integer (B, H, W) (or (H, W)) class maps.

        Target pixels equal to ``ignore_index`` are skipped; any other target value outside
        [0, K), or a prediction outside [0, K), is a ValueError (a label bug must not
        silently change the metric). Counts live on ``pred``'s device.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if pred.dim() == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        if pred.dim() != 3:
            raise ValueError(f"expected (B, H, W) class maps, got {tuple(pred.shape)}")
        k = self.num_classes
        pred, target = pred.long(), target.to(pred.device).long()
        if self.confusion.device != pred.device:
            self.confusion = self.confusion.to(pred.device)
            self.boundary = self.boundary.to(pred.device)
        valid = target != self.ignore_index  # (B, H, W)
        t, p = target[valid], pred[valid]  # (N,) each
        if t.numel():
            if int(t.min()) < 0 or int(t.max()) >= k:
                bad = t[(t < 0) | (t >= k)][0]
                raise ValueError(f"target value {int(bad)} outside [0, {k}) and not "
                                 f"ignore_index {self.ignore_index}")
            if int(p.min()) < 0 or int(p.max()) >= k:
                raise ValueError(f"prediction values must be in [0, {k})")
        self.confusion += torch.bincount(t * k + p, minlength=k * k).view(k, k)
        self._update_boundary(pred, target, valid)

    def _update_boundary(self, pred: Tensor, target: Tensor, valid: Tensor) -> None:
        tol = self.tolerance
        bt = boundary_map(target, valid)  # (B, H, W) bool
        bp = boundary_map(pred, valid)
        classes = torch.unique(torch.cat([target[bt], pred[bp]]))
        for c in classes.tolist():  # only classes with a boundary pixel somewhere
            bp_c, bt_c = bp & (pred == c), bt & (target == c)
            self.boundary[0, c] += bp_c.sum()
            self.boundary[1, c] += (bp_c & _dilate(bt_c, tol)).sum()
            self.boundary[2, c] += bt_c.sum()
            self.boundary[3, c] += (bt_c & _dilate(bp_c, tol)).sum()

    def reduce_across_processes(self) -> None:
        """Sum the counts over all ranks (no-op unless torch.distributed is initialised).

        Every rank must call it, also one whose shard was empty. NCCL reduces only CUDA
        tensors, so CPU counts travel through the current CUDA device there.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        flat = torch.cat([self.confusion.flatten(), self.boundary.flatten()])
        device = flat.device
        if dist.get_backend() == "nccl" and device.type != "cuda":
            flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(flat)
        flat = flat.to(device)
        k2 = self.num_classes ** 2
        self.confusion = flat[:k2].view(self.num_classes, self.num_classes).clone()
        self.boundary = flat[k2:].view(4, self.num_classes).clone()

    def compute(self) -> dict[str, float | list[float | None]]:
        """``{"miou", "per_class_iou", "pixel_acc", "boundary_f", "per_class_boundary_f"}``
        as Python floats / lists (``None`` for undefined per-class entries)."""
        cm = self.confusion.double().cpu()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp  # TP + FP + FN
        per_class: list[float | None] = [
            float(tp[c] / union[c]) if union[c] > 0 else None for c in range(self.num_classes)
        ]
        total = float(cm.sum())
        if total == 0:
            empty: list[float | None] = [None] * self.num_classes
            return {"miou": 0.0, "per_class_iou": per_class, "pixel_acc": 0.0,
                    "boundary_f": 0.0, "per_class_boundary_f": empty}
        present = [v for v in per_class if v is not None]
        b = self.boundary.double().cpu()
        per_class_f: list[float | None] = []
        for c in range(self.num_classes):
            n_p, m_p, n_t, m_t = b[:, c].tolist()
            if n_p + n_t == 0:
                per_class_f.append(None)
                continue
            prec = m_p / n_p if n_p else 0.0
            rec = m_t / n_t if n_t else 0.0
            per_class_f.append(2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0)
        fs = [f for f in per_class_f if f is not None]
        return {
            "miou": sum(present) / len(present),
            "per_class_iou": per_class,
            "pixel_acc": float(tp.sum()) / total,
            "boundary_f": sum(fs) / len(fs) if fs else 1.0,
            "per_class_boundary_f": per_class_f,
        }


def class_iou_mean(per_class_iou: Sequence[float | None], indices: Sequence[int]) -> float | None:
    """Mean IoU over ``indices`` (e.g. CamVid's thin/small classes 2, 6, 9, 10), skipping
    ``None`` entries; ``None`` if none of them is defined."""
    values = [per_class_iou[i] for i in indices if per_class_iou[i] is not None]
    return sum(values) / len(values) if values else None  # type: ignore[arg-type]

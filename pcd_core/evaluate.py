"""Evaluate a segmentation model on a split: mIoU, per-class IoU, pixel accuracy, boundary F.

Shared by the training loop (periodic validation), the end-of-run teacher-vs-student table
and ``python -m pcd_core eval``. In a distributed run every rank evaluates its shard and the
confusion statistics are reduced, so the numbers equal a single-process evaluation.

A long evaluation (a large validation split) can be interrupted: ``should_stop`` is polled
every ``poll_every`` batches (rank 0's answer is broadcast, so every rank stops at the same
batch) and raises :class:`pcd_core.progress.StopRequested`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from pcd_core.data import build_dataset, build_loader
from pcd_core.distributed import DistInfo, broadcast_flag
from pcd_core.metrics import SegmentationMetrics
from pcd_core.progress import StopRequested
from pcd_core.spec import DatasetSpec


def build_eval_dataset(spec: DatasetSpec, split: str, max_images: int | None) -> Dataset:
    """The eval transform (resize + normalise only), capped to the first ``max_images``."""
    ds: Dataset = build_dataset(spec, split, train=False)
    if max_images is not None and max_images < len(ds):  # type: ignore[arg-type]
        ds = Subset(ds, range(max_images))
    return ds


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    num_classes: int,
    ignore_index: int,
    batch_size: int,
    info: DistInfo,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    class_names: list[str] | None = None,
    should_stop: Callable[[], bool] | None = None,
    poll_every: int = 4,
) -> dict[str, Any]:
    """Metrics of ``model`` (a plain module, not DDP) on ``dataset``; restores train mode.

    ``amp_dtype`` enables CUDA autocast; logits are argmaxed in whatever dtype they come in,
    which does not change the prediction beyond ties. ``should_stop`` (given on every rank or
    on none) is polled before batch 0, ``poll_every``, ...; True raises ``StopRequested``.
    """
    was_training = model.training
    model.eval()
    loader = build_loader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, seed=0,
        drop_last=False, distributed=info.distributed,
    )
    metrics = SegmentationMetrics(num_classes, ignore_index)
    use_amp = amp_dtype is not None and info.device.type == "cuda"
    try:
        for i, (img, label) in enumerate(loader):
            if (should_stop is not None and i % poll_every == 0
                    and broadcast_flag(should_stop(), info)):
                raise StopRequested("evaluation")
            img = img.to(info.device, non_blocking=True)  # (B,3,H,W)
            with torch.autocast(info.device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(img)["out"]  # (B,K,H,W)
            metrics.update(logits.argmax(1).cpu(), label)  # (B,H,W) int64 each
    finally:
        model.train(was_training)
    if info.distributed:
        metrics.reduce_across_processes()
    result: dict[str, Any] = {k: _plain(v) for k, v in metrics.compute().items()}
    if class_names is not None:
        result["class_names"] = [str(n) for n in class_names]
    return result


def _plain(value: Any) -> Any:
    """Tensors and numpy values -> floats/lists, so results are JSON-able as they are."""
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.ndim else float(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value

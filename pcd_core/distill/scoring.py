"""Channel scores for PCD's pruning: exact per-class statistics of teacher features.

:class:`ChannelClassStats` accumulates, over any number of batches, per channel c and class k
the sum, sum of squares and pixel count of the teacher feature F_t[c] at pixels labelled k,
in float64 (a scoring pass sums millions of pixels; float32 sums drift). From these exact
moments every score is a closed form:

- ``class_gap``: mean over present class pairs i<j of |mu[c,i] - mu[c,j]|, divided by the
  channel's std over labelled pixels (so a channel is not favoured for its scale alone).
- ``fisher``: between-class variance / within-class variance.
- ``l1``: mean |F_t[c]| over all pixels (the classic magnitude pruning criterion; no labels).
- ``random``: uniform [0, 1) from a seeded generator (the ablation floor).

Void pixels (``ignore_index``) are excluded from every label-based statistic, the overall
std included, so the std describes the same pixels the class means come from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from pcd_core.distill.losses import labels_at

ScoreKind = Literal["class_gap", "fisher", "l1", "random"]
_EPS = 1e-12


@dataclass
class ChannelClassStats:
    """Exact running moments of teacher features per (channel, class); float64 on ``device``."""

    channels: int
    num_classes: int
    ignore_index: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        c, k, dev, f64 = self.channels, self.num_classes, self.device, torch.float64
        self.sums = torch.zeros(c, k, dtype=f64, device=dev)  # (C,K) sum of F[c], class k
        self.sumsq = torch.zeros(c, k, dtype=f64, device=dev)  # (C,K) sum of F[c]^2, class k
        self.counts = torch.zeros(k, dtype=f64, device=dev)  # (K,) labelled pixels of class k
        self.abs_sum = torch.zeros(c, dtype=f64, device=dev)  # (C,) sum |F[c]|, ALL pixels (l1)
        self.pixels = torch.zeros((), dtype=f64, device=dev)  # pixels behind abs_sum

    @torch.no_grad()
    def update(self, feat: Tensor, label: Tensor) -> None:
        """Add one batch: ``feat`` (B,C,h,w), ``label`` (B,H,W) at any resolution.

        Labels are nearest-downsampled to h x w (nearest: a label must stay a class, never a
        blend). Labels outside [0, num_classes) other than ``ignore_index`` are also skipped.
        """
        c, (h, w) = feat.shape[1], feat.shape[-2:]  # feat (B,C,h,w)
        if c != self.channels:
            raise ValueError(
                f"teacher tap has {c} channels; the method was built for {self.channels}"
            )
        lab = labels_at(label, (h, w)).to(self.device).long().reshape(-1)  # (N,), N = B*h*w
        x = feat.to(self.device, torch.float64).transpose(0, 1).reshape(c, -1)  # (C,N)
        self.abs_sum += x.abs().sum(dim=1)
        self.pixels += x.shape[1]
        keep = (lab >= 0) & (lab < self.num_classes) & (lab != self.ignore_index)
        lab, x = lab[keep], x[:, keep]  # (Nv,), (C,Nv)
        self.sums.index_add_(1, lab, x)
        self.sumsq.index_add_(1, lab, x * x)
        self.counts += torch.bincount(lab, minlength=self.num_classes).to(torch.float64)

    def all_reduce(self) -> None:
        """Sum the moments across DDP ranks so every rank prunes and matches identically."""
        if dist.is_available() and dist.is_initialized():
            for t in (self.sums, self.sumsq, self.counts, self.abs_sum, self.pixels):
                dist.all_reduce(t)

    def class_means(self) -> Tensor:
        """mu (C,K); NaN for classes never seen."""
        return self.sums / self.counts.where(self.counts > 0, torch.nan)

    def present(self) -> Tensor:
        """Bool (K,): classes with at least one labelled pixel."""
        return self.counts > 0

    def overall_mean_var(self) -> tuple[Tensor, Tensor]:
        """Mean and (population) variance (C,) of each channel over labelled pixels."""
        n = self.counts.sum().clamp_min(1)
        mean = self.sums.sum(1) / n
        var = (self.sumsq.sum(1) / n - mean**2).clamp_min(0)
        return mean, var


def class_gap_score(stats: ChannelClassStats) -> Tensor:
    """(C,) mean |mu_i - mu_j| over present class pairs i<j, over the channel's std."""
    mu = stats.class_means()[:, stats.present()]  # (C,P)
    p = mu.shape[1]
    gaps = (mu[:, :, None] - mu[:, None, :]).abs()  # (C,P,P), symmetric, zero diagonal
    mean_gap = gaps.sum(dim=(1, 2)) / (p * (p - 1))  # each i<j pair counted twice
    _, var = stats.overall_mean_var()
    return mean_gap / var.sqrt().clamp_min(_EPS)


def fisher_score(stats: ChannelClassStats) -> Tensor:
    """(C,) between-class variance / within-class variance over labelled pixels."""
    present = stats.present()
    n_k = stats.counts[present]  # (P,)
    mu = stats.class_means()[:, present]  # (C,P)
    mean, var = stats.overall_mean_var()
    n = n_k.sum()
    between = ((mu - mean[:, None]) ** 2 * n_k).sum(1) / n  # (C,)
    within = (var - between).clamp_min(0)  # total = between + within
    return between / within.clamp_min(_EPS)


def l1_score(stats: ChannelClassStats) -> Tensor:
    """(C,) mean |F[c]| over every pixel seen."""
    return stats.abs_sum / stats.pixels.clamp_min(1)


def random_score(channels: int, seed: int) -> Tensor:
    """(C,) uniform [0, 1) from a generator seeded with ``seed``: the same every run."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(channels, generator=g, dtype=torch.float64)


def preferred_class(stats: ChannelClassStats) -> Tensor:
    """(C,) long on CPU: the class each channel responds to most, as the largest
    standardised class mean (mu[c,k] - mean[c]) / std[c] over the classes present.

    Why: on a trained CamVid teacher most head channels are class detectors, and the
    classes are far from evenly served (measured: 96 of 256 channels peak on sky, 78 on
    road, 5 on tree); pruning by score alone can leave a class almost no channel."""
    mean, var = stats.overall_mean_var()
    z = (stats.class_means() - mean[:, None]) / var.sqrt().clamp_min(_EPS)[:, None]
    z = z.masked_fill(~stats.present()[None, :], -torch.inf)  # absent classes never win
    return z.argmax(dim=1).cpu()


def class_balanced_top_k(scores: Tensor, classes: Tensor, k: int) -> Tensor:
    """K channel indices taken round-robin over classes, each class's best-scored first.

    Every class that has a preferred channel gets one before any class gets a second, and
    so on; classes take turns in the order of their best channel's score, and within a
    class channels go by score (ties by index). Returns the kept channels sorted by score
    descending (ties by index), like plain top-K, so downstream code sees no difference.
    """
    order = torch.argsort(scores.double(), descending=True, stable=True).tolist()
    queues: dict[int, list[int]] = {}
    for c in order:  # classes enter in the order of their best channel
        queues.setdefault(int(classes[c]), []).append(c)
    kept: list[int] = []
    depth = 0
    while len(kept) < k:
        for queue in queues.values():
            if depth < len(queue) and len(kept) < k:
                kept.append(queue[depth])
        depth += 1
    rank = {c: i for i, c in enumerate(order)}
    return torch.tensor(sorted(kept, key=rank.__getitem__), dtype=torch.long)


def channel_scores(stats: ChannelClassStats, kind: ScoreKind, *, seed: int = 0) -> Tensor:
    """Scores (C,) float64 on CPU; higher = more worth distilling."""
    if kind == "random":
        return random_score(stats.channels, seed)
    if kind == "l1":
        return l1_score(stats).cpu()
    if int(stats.present().sum()) < 2:
        raise ValueError(
            f"score {kind!r} needs at least 2 labelled classes in the scoring pass; "
            f"saw {int(stats.present().sum())} (raise score_batches or check the labels)"
        )
    fn = class_gap_score if kind == "class_gap" else fisher_score
    return fn(stats).cpu()


__all__ = [
    "ChannelClassStats",
    "ScoreKind",
    "channel_scores",
    "class_balanced_top_k",
    "preferred_class",
]

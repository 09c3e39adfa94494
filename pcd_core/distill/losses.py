"""Loss functions shared by the methods: pixel-wise logit KD and channel-wise map losses.

All losses compute in float32 whatever the input dtype (AMP may hand bf16/fp16 features):
softmax, log and the KL sum are where low precision hurts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``x`` (B,C,h,w) to ``size``; a no-op (no copy) when already there."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=list(size), mode="bilinear", align_corners=False)


def labels_at(target: Tensor, size: Sequence[int]) -> Tensor:
    """Labels (B,H,W) nearest-resized to ``size`` (unchanged when already there)."""
    if tuple(target.shape[-2:]) == tuple(size):
        return target
    resized = F.interpolate(target[:, None].float(), size=list(size), mode="nearest")
    return resized[:, 0].long()


def valid_mask(target: Tensor, ignore_index: int, size: Sequence[int]) -> Tensor:
    """Bool (B,H,W) of labelled pixels, with the labels nearest-resized to ``size`` if needed."""
    return labels_at(target, size) != ignore_index


def kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, *, tau: float, ignore_index: int
) -> Tensor:
    """Pixel-wise logit KD (Hinton et al., per pixel).

    KL(softmax(t/tau) || softmax(s/tau)) summed over classes, averaged over the pixels whose
    label is not ``ignore_index``, times tau^2 (so gradients keep their scale as tau grows).
    Void pixels do not contribute: their teacher predictions are unsupervised guesses.
    Returns a scalar; 0 (still attached to the graph) when no pixel is labelled.
    """
    s = resize_to(student_logits, tuple(teacher_logits.shape[-2:]))  # (B,K,H,W)
    log_s = F.log_softmax(s.float() / tau, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / tau, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1)  # (B,H,W)
    mask = valid_mask(target, ignore_index, tuple(kl.shape[-2:]))
    n = mask.sum().clamp_min(1)
    return (kl * mask).sum() / n * tau**2


def spatial_kl(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """Per-channel KL between spatial softmaxes, times tau^2: the core of CWD and PCD.

    ``student`` and ``teacher`` are (B,C,h,w) with the same shape; each channel map is turned
    into a distribution over its h*w locations with softmax(x/tau), and
    KL(teacher || student) is summed over locations. Returns (B,C) so callers choose the
    reduction (plain mean for CWD, score-weighted mean for PCD).
    """
    b, c = student.shape[:2]
    log_s = F.log_softmax(student.float().reshape(b, c, -1) / tau, dim=-1)  # (B,C,h*w)
    log_t = F.log_softmax(teacher.float().reshape(b, c, -1) / tau, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(dim=-1) * tau**2  # (B,C)


def spatial_pearson_gap(student: Tensor, teacher: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-channel 1 - Pearson correlation of the two maps over their locations: (B,C).

    ``student`` and ``teacher`` are (B,C,h,w) with the same shape. Each map is centred and
    scaled to unit norm over its h*w locations, so the loss asks the student channel to rise
    and fall where the teacher channel does, whatever its scale and offset; unlike the
    spatial softmax it weighs the low parts of a map as much as its peaks. In [0, 2]; a
    constant map (zero variance) counts as uncorrelated (``eps`` bounds the norms below).
    Pearson's r is the cosine similarity of the centred maps.
    """
    b, c = student.shape[:2]
    s = student.float().reshape(b, c, -1)
    t = teacher.float().reshape(b, c, -1)
    s = s - s.mean(dim=-1, keepdim=True)
    t = t - t.mean(dim=-1, keepdim=True)
    return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=eps)


def class_profile_gap(
    student: Tensor, teacher: Tensor, target: Tensor, *, num_classes: int, ignore_index: int,
    eps: float = 1e-6,
) -> Tensor:
    """Per-channel 1 - Pearson correlation of the two maps' class profiles: (C,).

    A channel's class profile is its mean response over the batch's pixels of each class
    (labels nearest-resized to the maps, ``ignore_index`` left out), over the classes present
    in the batch: the statistic PCD's ``class_gap`` score ranks teacher channels by. The loss
    asks a student channel to separate the classes as its matched teacher channel does, at any
    scale and offset, and weighs a class by its presence, not by its pixel count. In [0, 2];
    with fewer than two classes present there is no profile, and the loss is 0 (attached to
    the graph, so the step's backward still reaches every parameter). Under DDP each rank
    takes the profiles of its own batch, as every other per-batch loss here does.
    """
    c = student.shape[1]
    labels = labels_at(target, tuple(student.shape[-2:])).reshape(-1)  # (N,) N = B*h*w
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    onehot = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).float()
    onehot = onehot * valid[:, None]  # (N,K)
    counts = onehot.sum(dim=0)  # (K,)
    present = counts > 0
    s = student.float().transpose(0, 1).reshape(c, -1)  # (C,N)
    t = teacher.float().transpose(0, 1).reshape(c, -1)
    if int(present.sum()) < 2:
        return s.sum(dim=1) * 0.0  # (C,) zeros on the student's graph
    onehot, counts = onehot[:, present], counts[present]
    s_prof = (s @ onehot) / counts  # (C,Kp) class means
    t_prof = (t @ onehot) / counts
    s_prof = s_prof - s_prof.mean(dim=1, keepdim=True)
    t_prof = t_prof - t_prof.mean(dim=1, keepdim=True)
    return 1.0 - F.cosine_similarity(s_prof, t_prof, dim=1, eps=eps)


def l2_normalised_maps(x: Tensor) -> Tensor:
    """(B,C,h,w) -> (C, B*h*w): each channel's maps over the batch as one unit vector."""
    c = x.shape[1]
    flat = x.float().transpose(0, 1).reshape(c, -1)
    return F.normalize(flat, dim=1)


__all__ = [
    "class_profile_gap", "kd_loss", "l2_normalised_maps", "labels_at", "resize_to",
    "spatial_kl", "spatial_pearson_gap", "valid_mask",
]

"""Student matching: which kept teacher channel each student channel learns.

The student has no adapter layer, so its own channels must learn teacher channels; the
matching picks, for each student channel, a DISTINCT kept teacher channel whose spatial maps
it already resembles most (a one-to-one assignment, so two student channels never chase the
same teacher channel and every student channel is used).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from pcd_core.distill.losses import l2_normalised_maps


@torch.no_grad()
def map_similarity(student: Tensor, teacher: Tensor) -> Tensor:
    """Cosine similarity (Cs,K) of channel maps: student (B,Cs,h,w) vs teacher (B,K,h,w).

    Each channel's maps over the whole batch (B*h*w values) are one vector; under DDP the
    (Cs,K) matrix is summed across ranks so that every rank computes the same assignment.
    """
    s = l2_normalised_maps(student)  # (Cs,N)
    t = l2_normalised_maps(teacher)  # (K,N)
    sim = s @ t.T  # (Cs,K)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sim)
    return sim


def hungarian(similarity: Tensor) -> Tensor:
    """Maximum-total-similarity one-to-one assignment; (Cs,K) with K >= Cs -> (Cs,) columns.

    ``scipy.optimize.linear_sum_assignment`` returns rows in order 0..Cs-1, so the result is
    indexed by student channel.
    """
    cost = similarity.detach().to("cpu", torch.float64).numpy()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    assert np.array_equal(rows, np.arange(cost.shape[0]))  # every student channel assigned
    return torch.from_numpy(cols).long()


def identity(student_channels: int) -> Tensor:
    """The ablation: student channel c learns the c-th kept channel (by descending score)."""
    return torch.arange(student_channels)


__all__ = ["hungarian", "identity", "map_similarity"]

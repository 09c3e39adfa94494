"""Student matching: which kept teacher channel each student channel learns.

The student has no adapter layer, so its own channels must learn teacher channels; the
matching pairs student channels with DISTINCT kept teacher channels whose spatial maps they
already resemble most (one-to-one, so two student channels never chase the same teacher
channel). With at least as many kept channels as student channels (K >= Cs, the default)
every student channel is paired; with fewer (K < Cs) every kept channel is, and the Cs - K
student channels left over learn from the other losses only.
"""

from __future__ import annotations

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


def hungarian(similarity: Tensor) -> tuple[Tensor, Tensor]:
    """Maximum-total-similarity one-to-one pairs on a (Cs,K) matrix: ``(rows, cols)``, each
    of min(Cs, K) indices (student channels, columns of kept), rows ascending.

    ``scipy.optimize.linear_sum_assignment`` takes rectangular matrices: with K >= Cs the
    rows are every student channel in order 0..Cs-1; with K < Cs they are the K student
    channels chosen.
    """
    cost = similarity.detach().to("cpu", torch.float64).numpy()
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return torch.from_numpy(rows).long(), torch.from_numpy(cols).long()


__all__ = ["hungarian", "map_similarity"]

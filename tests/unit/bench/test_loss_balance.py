"""bench/loss_balance.py: each loss part's gradient, taken on its own."""

from __future__ import annotations

import math

import torch
from torch import nn

from bench import loss_balance


def test_the_task_part_is_ce_plus_aux_and_method_parts_stand_alone() -> None:
    losses = {"ce": torch.tensor(1.0), "aux": torch.tensor(0.25),
              "pcd": torch.tensor(0.5), "kd": torch.tensor(2.0)}
    parts = loss_balance.grouped_parts(losses)
    assert sorted(parts) == ["ce", "kd", "pcd"]
    assert float(parts["ce"]) == 1.25
    assert float(parts["pcd"]) == 0.5 and float(parts["kd"]) == 2.0


def test_part_gradients_are_each_parts_own_with_zeros_where_it_has_none() -> None:
    used = nn.Parameter(torch.tensor([1.0, 2.0]))
    unused = nn.Parameter(torch.tensor([3.0]))
    parts = {"a": (used ** 2).sum(), "b": 3 * used[0] + unused[0]}
    grads = loss_balance.part_gradients(parts, [used, unused])
    assert grads["a"].tolist() == [2.0, 4.0, 0.0]  # d/dx x^2 = 2x; ``unused`` gets zeros
    assert grads["b"].tolist() == [3.0, 0.0, 1.0]
    assert used.grad is None  # nothing accumulates into .grad: the student is not touched


def test_cosine_of_parallel_orthogonal_and_zero_vectors() -> None:
    a = torch.tensor([1.0, 0.0])
    assert loss_balance.cosine(a, 2 * a) == 1.0
    assert loss_balance.cosine(a, torch.tensor([0.0, 5.0])) == 0.0
    assert math.isnan(loss_balance.cosine(a, torch.zeros(2)))

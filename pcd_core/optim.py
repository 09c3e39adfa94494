"""Optimiser and learning-rate schedule of a run (torchvision's segmentation recipe).

SGD with momentum (or AdamW) over the student's and the method's parameters, without
weight decay on BatchNorm and bias parameters (decaying them only fights the
normalisation); poly decay ``(1 - t/T)^power`` after an optional linear warmup.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pcd_core.spec import TrainSpec


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """Two groups: weights of convs/linears decay; 1-d parameters (BN, biases) do not."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(spec: TrainSpec, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    groups = param_groups(modules, spec.weight_decay)
    if spec.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum)
    return torch.optim.AdamW(groups, lr=spec.lr)


@dataclass
class PolySchedule:
    """LR factor at step t: linear warmup to 1 over ``warmup`` steps, then poly decay to 0 at
    ``total``. A dataclass (not a lambda) so LambdaLR's state_dict stores its fields."""

    total: int
    warmup: int
    power: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        return max(0.0, 1.0 - (step - self.warmup) / span) ** self.power


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainSpec
) -> torch.optim.lr_scheduler.LambdaLR:
    schedule = PolySchedule(spec.iterations, min(spec.warmup_iterations, spec.iterations),
                            spec.poly_power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

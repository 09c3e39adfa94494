"""The one interface every distillation method implements, and the registry that builds them.

The training loop is method-agnostic: it runs the student (and the frozen teacher when
``needs_teacher``), adds cross-entropy itself, and adds whatever weighted losses the method
returns by name (``kd``, ``cwd``, ``pcd``), so logs and the dashboard show the parts. A method
is an ``nn.Module`` so that its trainable parts (CWD's adapter) are optimised with the student
and its state (PCD's scores and matching) travels in ``state_dict`` for exact resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from pcd_core.spec import MethodSpec

# MethodSpec.tap -> the key of the model output dict that holds that feature.
TAP_KEYS: dict[str, str] = {"head": "feat", "head_preact": "feat_preact",
                            "backbone": "backbone"}


class DistillMethod(nn.Module):
    """Base class: a distillation loss with an optional scoring pass.

    Contract:
    - ``needs_teacher``: whether the loop must run the teacher and pass ``teacher_out``.
    - ``tap_key``: which entry of the model output dicts the feature methods read
      (``"feat"`` for ``tap=head``, ``"feat_preact"`` for ``tap=head_preact``,
      ``"backbone"`` for ``tap=backbone``).
    - ``prepare(teacher, batches, device)``: once before training (the ``scoring`` phase);
      returns a JSON-able summary. The teacher is run frozen and never mutated.
    - ``forward(student_out, teacher_out, target, iteration)``: WEIGHTED losses by name; CE is
      excluded. Teacher tensors are detached inside, so no gradient can reach the teacher.
    """

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True

    def __init__(
        self,
        spec: MethodSpec,
        *,
        teacher_channels: int,
        student_channels: int,
        num_classes: int,
        ignore_index: int,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.tap_key: str = TAP_KEYS[spec.tap]
        self.teacher_channels = teacher_channels
        self.student_channels = student_channels
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def prepare(
        self,
        teacher: nn.Module,
        batches: Iterable[tuple[Tensor, Tensor]],
        device: torch.device | str,
    ) -> dict[str, Any]:
        """The scoring pass; a no-op for methods that need none."""
        return {}

    def forward(
        self,
        student_out: dict[str, Tensor],
        teacher_out: dict[str, Tensor] | None,
        target: Tensor,
        iteration: int,
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def loss_schedule(self, name: str) -> str:
        """The ``weight_schedule`` that scales this method's loss ``name``: the method's
        own for every loss unless a method says otherwise (PCD's logit KD may keep its own)."""
        return self.spec.weight_schedule

    def _teacher(self, teacher_out: dict[str, Tensor] | None, key: str) -> Tensor:
        """The teacher's ``key`` output, detached: the only way methods read the teacher."""
        if teacher_out is None:
            raise ValueError(f"method {self.name!r} needs teacher outputs, got None")
        return teacher_out[key].detach()


def weight_factor(schedule: str, step: int, iterations: int) -> float:
    """The multiplier of every distillation loss at 0-based ``step`` of ``iterations``.

    ``constant``: 1. ``linear_decay``: 1 - step/iterations, from 1 at the first step to
    1/iterations at the last, so distillation guides the early, feature-forming phase and
    cross-entropy alone has the final say. Lives in the loop, not in each method, because it
    is the same for all of them.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "linear_decay":
        return max(0.0, 1.0 - step / iterations)
    raise ValueError(f"unknown weight_schedule {schedule!r}; choose constant or linear_decay")


M = TypeVar("M", bound=type[DistillMethod])
METHODS: dict[str, type[DistillMethod]] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Register a :class:`DistillMethod` subclass under ``name``; duplicates are an error."""

    def deco(cls: M) -> M:
        if name in METHODS:
            raise ValueError(f"distill method {name!r} is already registered")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Names of every registered method (equals the choices of ``MethodSpec.name``)."""
    return sorted(METHODS)


def build_method(
    spec: MethodSpec,
    *,
    teacher_channels: int,
    student_channels: int,
    num_classes: int,
    ignore_index: int,
) -> DistillMethod:
    """Build the method ``spec.name``; the channels are those of the tap (see ``tap_key``).

    Invalid combinations (e.g. PCD keeping fewer teacher channels than the student has) raise
    ``ValueError`` here, before any training starts.
    """
    try:
        cls = METHODS[spec.name]
    except KeyError:
        raise ValueError(
            f"unknown distill method {spec.name!r}; choose from {list_methods()}"
        ) from None
    return cls(
        spec,
        teacher_channels=teacher_channels,
        student_channels=student_channels,
        num_classes=num_classes,
        ignore_index=ignore_index,
    )

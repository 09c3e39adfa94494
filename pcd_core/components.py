"""The networks of a run: the student, the frozen teacher and the distillation method.

Split from ``train.py`` because the spec checks here must fail fast, before any data is
read or any training starts: a distillation without a teacher checkpoint, or a teacher
checkpoint that does not fit its architecture, is reported in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcd_core.distill import DistillMethod, build_method
from pcd_core.models import build_model_from_spec, load_weights
from pcd_core.spec import RunSpec

STUDENT_WEIGHTS = "student.safetensors"


class TeacherMissingError(ValueError):
    """A distillation spec names no usable teacher checkpoint (error code ``spec_invalid``)."""


@dataclass
class Models:
    """Everything with parameters or optimiser state; ``optimizer``/``scheduler``/``scaler``
    are filled in by ``train.run`` once the modules exist."""

    student: nn.Module
    teacher: nn.Module | None
    method: DistillMethod
    class_weights: torch.Tensor | None = None  # (num_classes,) for the CE terms; None: equal
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None


def resolve_teacher_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A weights file, or a student directory written by ``train``/``distill``
    (its ``student.safetensors`` is used). Raises :class:`TeacherMissingError`."""
    p = Path(path)
    if p.is_dir():
        p = p / STUDENT_WEIGHTS
    if not p.is_file():
        raise TeacherMissingError(f"teacher checkpoint {path} does not exist")
    return p


def check_run_spec(spec: RunSpec) -> None:
    """Cheap checks ``RunSpec`` validation cannot make (they need the file system)."""
    if spec.method.name == "none":
        return
    if spec.teacher is None or not spec.teacher.checkpoint:
        raise TeacherMissingError(
            f"method {spec.method.name!r} distils from a trained teacher: set "
            f"teacher.checkpoint to its weights (safetensors, or a directory written by "
            f"`python -m pcd_core train`)"
        )
    resolve_teacher_checkpoint(spec.teacher.checkpoint)


def build_teacher(spec: RunSpec, device: torch.device) -> nn.Module | None:
    """The frozen teacher: weights loaded strictly, no gradients, BatchNorm in eval for good.

    None when the method needs no teacher or (method ``none``) none is given with weights.
    """
    if spec.teacher is None or not spec.teacher.checkpoint:
        return None
    teacher = build_model_from_spec(spec.teacher, spec.dataset.num_classes)
    load_weights(teacher, resolve_teacher_checkpoint(spec.teacher.checkpoint))
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(device)


def tap_channels(model: nn.Module, tap: str) -> int:
    channels = model.backbone_channels if tap == "backbone" else model.feat_channels
    return int(channels)  # type: ignore[arg-type]  # plain int attributes on our models


def build_models(spec: RunSpec, device: torch.device) -> Models:
    """Student (fresh init), teacher (loaded, frozen) and method, on ``device``."""
    teacher = build_teacher(spec, device)
    student = build_model_from_spec(spec.student, spec.dataset.num_classes).to(device)
    s_ch = tap_channels(student, spec.method.tap)
    t_ch = tap_channels(teacher, spec.method.tap) if teacher is not None else s_ch
    method = build_method(
        spec.method, teacher_channels=t_ch, student_channels=s_ch,
        num_classes=spec.dataset.num_classes, ignore_index=spec.dataset.ignore_index,
    ).to(device)
    if method.needs_teacher and teacher is None:
        raise TeacherMissingError(f"method {spec.method.name!r} needs a teacher")
    return Models(student=student, teacher=teacher, method=method)

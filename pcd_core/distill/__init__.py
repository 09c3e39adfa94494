"""Distillation methods behind one interface: none (CE only), kd, cwd and pcd.

``build_method(spec, teacher_channels=..., student_channels=..., num_classes=...,
ignore_index=...)`` returns a :class:`DistillMethod`; see ``docs/CONTRACTS.md``. The method
modules are imported here explicitly so that importing the package registers all of them.
"""

from pcd_core.distill.base import (
    METHODS,
    TAP_KEYS,
    DistillMethod,
    build_method,
    list_methods,
    register_method,
    weight_factor,
)
from pcd_core.distill.baselines import ChannelWiseDistill, LogitKD, NoDistill
from pcd_core.distill.pcd import PCD

__all__ = [
    "METHODS",
    "PCD",
    "TAP_KEYS",
    "ChannelWiseDistill",
    "DistillMethod",
    "LogitKD",
    "NoDistill",
    "build_method",
    "list_methods",
    "register_method",
    "weight_factor",
]

"""Torch-free catalogue of model architecture names.

The API validates ``arch`` fields without importing torch, so the set of valid names lives
here as plain data. ``pcd_core.models.registry`` builds the same names from its registered
heads and backbones; a unit test asserts the two agree, so this list cannot drift.
"""

from __future__ import annotations

HEADS: tuple[str, ...] = ("deeplabv3", "pspnet", "fcn")
BACKBONES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")


def model_names() -> list[str]:
    """Every buildable architecture, as ``{head}_{backbone}``."""
    return sorted(f"{h}_{b}" for h in HEADS for b in BACKBONES)


def split_arch(arch: str) -> tuple[str, str]:
    """Split ``deeplabv3_resnet18`` into ``("deeplabv3", "resnet18")``; ValueError if unknown."""
    for head in HEADS:
        prefix = head + "_"
        if arch.startswith(prefix) and arch[len(prefix) :] in BACKBONES:
            return head, arch[len(prefix) :]
    raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(model_names())}")

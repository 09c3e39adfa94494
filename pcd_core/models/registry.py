"""Name -> constructor tables for backbones and heads (torchvision's twenty-line registry idea).

A backbone factory takes the output stride and returns a module whose ``forward(x)`` gives
``(stage3, last)`` features and which exposes ``out_channels``, ``aux_channels`` and ``small``
(small backbones get narrower default heads). A head factory takes
``(in_channels, num_classes, *, channels, output_stride)``. Modules register themselves with
the decorators; ``pcd_core.models.factory`` imports them explicitly, so no star-import magic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., nn.Module])


class HeadWidths(NamedTuple):
    """Default width of a head's last hidden layer for large (ResNet-50/101) and small backbones."""

    large: int
    small: int


BACKBONES: dict[str, Callable[[int], nn.Module]] = {}
HEADS: dict[str, tuple[Callable[..., nn.Module], HeadWidths]] = {}


def register_backbone(name: str) -> Callable[[F], F]:
    """Register ``fn(output_stride) -> backbone`` under ``name``; duplicates are an error."""

    def deco(fn: F) -> F:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = fn
        return fn

    return deco


def register_head(name: str, *, widths: HeadWidths) -> Callable[[F], F]:
    """Register a head factory under ``name`` with its default widths; duplicates are an error."""

    def deco(fn: F) -> F:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered")
        HEADS[name] = (fn, widths)
        return fn

    return deco

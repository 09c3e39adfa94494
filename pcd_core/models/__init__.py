"""Segmentation models: ResNet / MobileNetV2 backbones under DeepLabV3, PSPNet and FCN heads.

Importing this package stays torch-free: ``pcd_core.spec`` (used by the API process, which must
never load torch) imports ``pcd_core.models.catalog``. The torch-based names below are
resolved on first use (PEP 562); ``factory`` registers every backbone and head explicitly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pcd_core.models.factory import build_model, build_model_from_spec, list_models
    from pcd_core.models.segmentation import SegmentationModel
    from pcd_core.models.weights import WeightsError, load_weights, read_state_dict, save_weights

_LAZY: dict[str, str] = {
    "build_model": "factory",
    "build_model_from_spec": "factory",
    "list_models": "factory",
    "SegmentationModel": "segmentation",
    "WeightsError": "weights",
    "load_weights": "weights",
    "read_state_dict": "weights",
    "save_weights": "weights",
}

__all__ = [
    "SegmentationModel",
    "WeightsError",
    "build_model",
    "build_model_from_spec",
    "list_models",
    "load_weights",
    "read_state_dict",
    "save_weights",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

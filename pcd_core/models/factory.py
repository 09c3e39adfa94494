"""Build models by name. Importing this module registers every backbone and head.

The registrations are the explicit imports below (no star-import side effects); the
torch-free name list in ``catalog.py`` must equal :func:`list_models`, which a test checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcd_core.models import heads, mobilenet, resnet
from pcd_core.models.catalog import split_arch
from pcd_core.models.layers import init_weights
from pcd_core.models.registry import BACKBONES, HEADS
from pcd_core.models.segmentation import SegmentationModel, int_attr

if TYPE_CHECKING:
    from pcd_core.spec import ModelSpec

# Imported for their @register_* decorators; named here so the intent survives linting.
REGISTERING_MODULES = (heads, mobilenet, resnet)


def list_models() -> list[str]:
    """Every buildable ``{head}_{backbone}``, sorted."""
    return sorted(f"{h}_{b}" for h in HEADS for b in BACKBONES)


def build_model(
    arch: str,
    num_classes: int,
    *,
    output_stride: int = 8,
    head_channels: int | None = None,
    aux: bool = False,
) -> SegmentationModel:
    """Build ``arch`` (e.g. ``deeplabv3_resnet18``) with freshly initialised weights.

    ``head_channels`` is the width of the head's last hidden layer (the ``feat`` tap); None
    picks the registered default: torchvision's for ResNet-50/101, 128 for small backbones.
    The aux head is torchvision's FCN head on stage 3 (width stage3 / 4).
    """
    head_name, backbone_name = split_arch(arch)
    if arch not in list_models():
        raise ValueError(f"arch {arch!r} is in the catalogue but not registered")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if head_channels is not None and head_channels < 1:
        raise ValueError(f"head_channels must be positive, got {head_channels}")
    backbone = BACKBONES[backbone_name](output_stride)
    head_factory, widths = HEADS[head_name]
    if head_channels is None:
        head_channels = widths.small if getattr(backbone, "small", False) is True else widths.large
    classifier = head_factory(
        int_attr(backbone, "out_channels"),
        num_classes,
        channels=head_channels,
        output_stride=output_stride,
    )
    aux_classifier = None
    if aux:
        aux_in = int_attr(backbone, "aux_channels")
        aux_classifier = heads.fcn_head(aux_in, num_classes, aux_in // 4)
    model = SegmentationModel(
        arch,
        backbone,
        classifier,
        aux_classifier,
        num_classes=num_classes,
        output_stride=output_stride,
    )
    # Heads are initialised like the backbones (He for convs, identity BN).
    for module in (classifier, aux_classifier):
        if module is not None:
            init_weights(module)
    return model


def build_model_from_spec(spec: ModelSpec, num_classes: int) -> SegmentationModel:
    """Build the network a :class:`~pcd_core.spec.ModelSpec` describes (weights not loaded)."""
    return build_model(
        spec.arch,
        num_classes,
        output_stride=spec.output_stride,
        head_channels=spec.head_channels,
        aux=spec.aux,
    )

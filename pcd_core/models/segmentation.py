"""The one model class every architecture is: backbone -> head (-> optional aux head).

``forward`` returns a dict with fixed keys (docs/CONTRACTS.md) so that training, distillation
and export code never depend on the architecture: ``out`` (logits at input size), ``feat``
(head tap), ``feat_preact`` (the head tap before its activation), ``backbone`` (last-stage
tap) and, when built with ``aux=True``, ``aux``.
The taps are plain return values, not forward hooks, so the model scripts and exports as is.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def int_attr(module: nn.Module, name: str) -> int:
    """An int attribute that registered modules promise (``out_channels``, ``channels``...);
    a TypeError names the broken registration instead of failing deep inside a forward."""
    value = getattr(module, name, None)
    if not isinstance(value, int):
        raise TypeError(f"{type(module).__name__} must define an int attribute {name!r}")
    return value


class SegmentationModel(nn.Module):
    """``backbone``, ``classifier`` and ``aux_classifier`` carry torchvision's names, so the
    state dicts of ``deeplabv3_resnet50`` & co. equal torchvision's key for key.

    ``backbone(x)`` must return ``(stage3, last)`` and define ``out_channels``; the heads
    return ``(preact, feat, logits)`` (see ``heads.TappedSequential``) and define ``channels``.
    """

    def __init__(
        self,
        arch: str,
        backbone: nn.Module,
        classifier: nn.Module,
        aux_classifier: nn.Module | None,
        *,
        num_classes: int,
        output_stride: int,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.arch: str = arch
        self.num_classes: int = num_classes
        self.output_stride: int = output_stride
        self.feat_channels: int = int_attr(classifier, "channels")
        self.backbone_channels: int = int_attr(backbone, "out_channels")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h, w = x.shape[-2], x.shape[-1]
        stage3, last = self.backbone(x)  # (B, aux_ch, h', w'), (B, backbone_ch, H/os, W/os)
        # preact and feat (B, feat_ch, H/os, W/os), logits (B, K, H/os, W/os)
        preact, feat, logits = self.classifier(last)
        result: dict[str, Tensor] = {
            "out": F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False),
            "feat": feat,
            "feat_preact": preact,
            "backbone": last,
        }
        if self.aux_classifier is not None:
            _, _, aux = self.aux_classifier(stage3)
            result["aux"] = F.interpolate(aux, size=(h, w), mode="bilinear", align_corners=False)
        return result

    def extra_repr(self) -> str:
        return f"arch={self.arch}, num_classes={self.num_classes}, os={self.output_stride}"

"""Segmentation heads: DeepLabV3 (ASPP), PSPNet (pyramid pooling) and FCN.

Every head is a :class:`TappedSequential`: the children keep torchvision's numbering (for
DeepLabV3 and FCN, ``classifier.0.convs.0.0.weight``... ``classifier.4.bias``), and ``forward``
returns ``(preact, feat, logits)`` where ``feat`` is the last hidden activation, the PCD
"head" tap, and ``preact`` the same layer before its activation (the "head_preact" tap).
The tap is taken before any dropout: in eval mode it is exactly the final 1x1 classifier's
input, and in training the distillation target is not noised by the student's dropout mask.
The activation at the tap is not in place, so that it leaves ``preact`` intact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcd_core.models.layers import ConvBNAct, adaptive_avg_pool
from pcd_core.models.registry import HeadWidths, register_head

# ASPP dilation rates per output stride: DeepLabV3's (6, 12, 18) at 16, doubled at 8 (as
# torchvision's OS8 models use), halved at 32 so the branches still see distinct contexts.
ASPP_RATES: dict[int, tuple[int, int, int]] = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


class TappedSequential(nn.Sequential):
    """A ``Sequential`` that also returns the outputs of children ``tap - 1`` and ``tap``.

    Child ``tap`` is the hidden layer's activation (the feature tap) and child ``tap - 1`` what
    it activates (the normalised pre-activation). Post-ReLU features lose everything below zero;
    the pre-activation keeps how far below, which feature distillation may want to pass on
    (Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019).
    """

    def __init__(self, *layers: nn.Module, tap: int, channels: int) -> None:
        super().__init__(*layers)
        act = self[tap]
        if tap < 1 or getattr(act, "inplace", False):
            # An in-place activation would overwrite the pre-activation it is handed.
            raise ValueError(f"tap {tap}: needs a child before it and an activation that is "
                             f"not in place, got {act!r}")
        self.tap: int = tap
        self.channels: int = channels  # channels of the tapped feature

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        preact = feat = x
        for i, layer in enumerate(self):
            x = layer(x)
            if i == self.tap - 1:
                preact = x
            elif i == self.tap:
                feat = x
        return preact, feat, x


class ASPPPooling(nn.Sequential):
    """Image-level branch: global average, 1x1 conv-BN-ReLU, broadcast back to (h, w).

    Children ``0`` (pool), ``1`` conv, ``2`` BN, ``3`` ReLU match torchvision's names.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        for layer in self:
            x = layer(x)  # (B, cout, 1, 1)
        # Bilinear upsampling of a 1x1 map is a constant map; expand says so without a resize.
        return x.expand(-1, -1, h, w)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3 branches and the image
    pooling branch, concatenated (5 * cout) and projected back to ``cout``."""

    def __init__(self, cin: int, rates: tuple[int, int, int], cout: int) -> None:
        super().__init__()
        branches: list[nn.Module] = [ConvBNAct(cin, cout, 1)]
        branches += [ConvBNAct(cin, cout, 3, dilation=r) for r in rates]
        branches.append(ASPPPooling(cin, cout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(5 * cout, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x: Tensor) -> Tensor:
        outs: list[Tensor] = []
        for branch in self.convs:
            outs.append(branch(x))  # each (B, cout, h, w)
        return self.project(torch.cat(outs, dim=1))  # (B, 5*cout, h, w) -> (B, cout, h, w)


class PyramidBranch(nn.Sequential):
    """Average to ``bins x bins``, 1x1 conv-BN-ReLU, upsample back to (h, w)."""

    def __init__(self, cin: int, cout: int, bins: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.bins: int = bins

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        y = adaptive_avg_pool(x, self.bins)  # (B, cin, bins, bins), export-safe at any h, w
        for layer in self:
            y = layer(y)
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module: the input concatenated with four pooled context maps
    (bins 1, 2, 3, 6), each reduced to cin/4 channels, so the output has 2 * cin channels."""

    def __init__(self, cin: int, bins: tuple[int, ...] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.stages = nn.ModuleList([PyramidBranch(cin, cin // len(bins), b) for b in bins])
        self.out_channels: int = cin + len(bins) * (cin // len(bins))

    def forward(self, x: Tensor) -> Tensor:
        outs: list[Tensor] = [x]
        for stage in self.stages:
            outs.append(stage(x))
        return torch.cat(outs, dim=1)  # (B, 2*cin, h, w)


def fcn_head(cin: int, num_classes: int, channels: int) -> TappedSequential:
    """torchvision's ``FCNHead`` layout: conv3x3-BN-ReLU, dropout 0.1, 1x1 classifier.

    Also the auxiliary head (``aux_classifier``), built there with ``channels = cin // 4``.
    """
    return TappedSequential(
        nn.Conv2d(cin, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Conv2d(channels, num_classes, 1),
        tap=2,
        channels=channels,
    )


@register_head("deeplabv3", widths=HeadWidths(large=256, small=128))
def deeplabv3_head(
    cin: int, num_classes: int, *, channels: int, output_stride: int
) -> TappedSequential:
    """torchvision's ``DeepLabHead``: ASPP(channels), conv3x3-BN-ReLU, 1x1 classifier."""
    return TappedSequential(
        ASPP(cin, ASPP_RATES[output_stride], channels),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, num_classes, 1),
        tap=3,
        channels=channels,
    )


@register_head("pspnet", widths=HeadWidths(large=512, small=128))
def pspnet_head(
    cin: int, num_classes: int, *, channels: int, output_stride: int
) -> TappedSequential:
    """PSPNet: pyramid pooling, conv3x3-BN-ReLU bottleneck, dropout 0.1, 1x1 classifier."""
    ppm = PyramidPooling(cin)
    return TappedSequential(
        ppm,
        nn.Conv2d(ppm.out_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Conv2d(channels, num_classes, 1),
        tap=3,
        channels=channels,
    )


@register_head("fcn", widths=HeadWidths(large=512, small=128))
def fcn_seg_head(
    cin: int, num_classes: int, *, channels: int, output_stride: int
) -> TappedSequential:
    """FCN: torchvision's default width is cin / 4 (512 on ResNet-50/101's 2048 channels)."""
    return fcn_head(cin, num_classes, channels)

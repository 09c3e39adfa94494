"""MobileNetV2 backbone for dense prediction.

The module is torchvision's ``mobilenet_v2().features[:18]`` as torchvision's segmentation
models wrap it (``IntermediateLayerGetter`` over ``features``): its children are named ``0`` to
``17``, so keys read ``backbone.0.0.weight``, ``backbone.1.conv.0.0.weight``... An ImageNet
checkpoint maps over by renaming ``features.N`` to ``backbone.N``. The final 1x1 conv to 1280
channels (``features.18``) is an ImageNet-classifier layer and is dropped, as segmentation
codebases (CIRKD, DeepLabV3+ ports) do: the last stage has 320 channels.
"""

from __future__ import annotations

from torch import Tensor, nn

from pcd_core.models.layers import ConvBNAct, init_weights
from pcd_core.models.registry import register_backbone

# (expansion t, out channels c, repeats n, first stride s): Sandler et al. 2018, Table 2.
_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Index of the last block at output stride 16 (96 channels): the stage-3 tap for the aux head.
_AUX_INDEX = 13


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t == 1), 3x3 depthwise, 1x1 linear projection; residual when
    the shape is kept. ``conv`` children follow torchvision's numbering."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, dilation: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(cin, hidden, 1, act=nn.ReLU6))
        layers += [
            ConvBNAct(
                hidden, hidden, 3, stride=stride, dilation=dilation, groups=hidden, act=nn.ReLU6
            ),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual: bool = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Sequential):
    """Children ``0``..``17``; ``forward`` returns ``(block 13, block 17)`` features.

    Shapes for input (B, 3, H, W) at output stride 8: (B, 96, H/8, W/8) and (B, 320, H/8, W/8).
    A block that would push the stride past ``output_stride`` keeps stride 1; later blocks
    dilate their depthwise conv by the stride skipped (the ResNet rule, see ``resnet.py``).
    """

    def __init__(self, output_stride: int = 8) -> None:
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        layers: list[nn.Module] = [ConvBNAct(3, 32, 3, stride=2, act=nn.ReLU6)]
        cin, stride_so_far, dilation = 32, 2, 1
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                stride, block_dilation = (s if i == 0 else 1), dilation
                if stride > 1 and stride_so_far * stride > output_stride:
                    dilation, stride = dilation * stride, 1
                stride_so_far *= stride
                layers.append(InvertedResidual(cin, c, stride, t, block_dilation))
                cin = c
        super().__init__(*layers)
        self.aux_channels: int = _SETTINGS[4][1]
        self.out_channels: int = cin
        self.small: bool = True
        self.aux_index: int = _AUX_INDEX  # an attribute: TorchScript cannot read the global
        init_weights(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        aux = x
        for i, layer in enumerate(self):
            x = layer(x)
            if i == self.aux_index:
                aux = x  # (B, 96, H/8 or H/16, ...)
        return aux, x  # (B, 320, H/os, W/os)


@register_backbone("mobilenet_v2")
def mobilenet_v2(output_stride: int = 8) -> MobileNetV2:
    return MobileNetV2(output_stride)

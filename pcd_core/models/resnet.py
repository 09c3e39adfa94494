"""ResNet-18/34/50/101 backbones for dense prediction.

Parameter names follow torchvision's ``resnet`` (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``...) without ``fc``, which is what torchvision's segmentation models
keep, so torchvision and CIRKD checkpoints load unchanged. Output stride 8 or 16 is reached as
in DeepLab: the last stages keep stride 1 and dilate their 3x3 convs instead, so the receptive
field grows while the feature map stays large. Unlike torchvision, BasicBlock (ResNet-18/34)
supports dilation too: the small students need it.
"""

from __future__ import annotations

from torch import Tensor, nn

from pcd_core.models.layers import init_weights
from pcd_core.models.registry import register_backbone

# Which of layer2/3/4 trade stride for dilation at each output stride.
_DILATE: dict[int, tuple[bool, bool, bool]] = {
    32: (False, False, False),
    16: (False, False, True),
    8: (False, True, True),
}


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut. ResNet-18/34."""

    expansion = 1

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries stride and dilation: "ResNet v1.5"), 1x1 expand x4."""

    expansion = 4

    def __init__(
        self,
        cin: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def _make_stage(
    block: type[BasicBlock] | type[Bottleneck],
    cin: int,
    planes: int,
    blocks: int,
    stride: int,
    dilation: int,
    dilate: bool,
) -> tuple[nn.Sequential, int, int]:
    """One ``layerN``; returns it with its output channels and the dilation after it.

    A dilated stage drops its stride and multiplies the dilation by it; its first block still
    uses the previous dilation (as DeepLab and torchvision do), the others the new one.
    """
    first_dilation = dilation
    if dilate:
        dilation, stride = dilation * stride, 1
    cout = planes * block.expansion
    downsample = None
    if stride != 1 or cin != cout:
        downsample = nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )
    layers = [block(cin, planes, stride, first_dilation, downsample)]
    layers += [block(cout, planes, 1, dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers), cout, dilation


class ResNet(nn.Module):
    """Stem + four stages; ``forward`` returns ``(layer3, layer4)`` features.

    Shapes for input (B, 3, H, W) at output stride 8: layer3 (B, 256e, H/8, W/8) and layer4
    (B, 512e, H/8, W/8), with e = 1 (BasicBlock) or 4 (Bottleneck).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, int, int, int],
        output_stride: int = 8,
    ) -> None:
        super().__init__()
        if output_stride not in _DILATE:
            raise ValueError(f"output_stride must be one of {sorted(_DILATE)}, got {output_stride}")
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        d2, d3, d4 = _DILATE[output_stride]
        self.layer1, c, d = _make_stage(block, 64, 64, depths[0], 1, 1, False)
        self.layer2, c, d = _make_stage(block, c, 128, depths[1], 2, d, d2)
        self.layer3, c3, d = _make_stage(block, c, 256, depths[2], 2, d, d3)
        self.layer4, c4, d = _make_stage(block, c3, 512, depths[3], 2, d, d4)
        self.aux_channels: int = c3
        self.out_channels: int = c4
        self.small: bool = block is BasicBlock
        init_weights(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        x = self.layer2(self.layer1(x))  # (B, 128e, H/8, W/8)
        c3 = self.layer3(x)  # (B, 256e, H/8 or H/16, ...)
        c4 = self.layer4(c3)  # (B, 512e, H/os, W/os)
        return c3, c4


@register_backbone("resnet18")
def resnet18(output_stride: int = 8) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), output_stride)


@register_backbone("resnet34")
def resnet34(output_stride: int = 8) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), output_stride)


@register_backbone("resnet50")
def resnet50(output_stride: int = 8) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), output_stride)


@register_backbone("resnet101")
def resnet101(output_stride: int = 8) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), output_stride)

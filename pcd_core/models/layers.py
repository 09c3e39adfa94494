"""Small building blocks shared by the backbones and heads.

Kept separate so that ``resnet``, ``mobilenet`` and ``heads`` agree on initialisation and on
the conv-BN-activation triple whose child indices (0 conv, 1 BN, 2 activation) fix the
torchvision-compatible state-dict names.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ConvBNAct(nn.Sequential):
    """conv (no bias) -> BatchNorm -> activation, as children ``0``, ``1``, ``2``.

    Matches torchvision's ``Conv2dNormActivation`` naming, so ``features.0.0.weight`` style
    keys line up. Padding keeps the spatial size for odd kernels at stride 1.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        act: type[nn.Module] = nn.ReLU,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(
                cin,
                cout,
                kernel_size,
                stride,
                padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(cout),
            act(inplace=True),
        )


def init_weights(module: nn.Module) -> None:
    """He init (fan_out, as torchvision's ResNet) with zero bias for convs, identity BN.

    Called once on a freshly built network so that students trained from scratch start from
    the same well-conditioned point whatever their architecture."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def adaptive_avg_pool(x: Tensor, bins: int) -> Tensor:
    """``F.adaptive_avg_pool2d(x, bins)`` written as two matrix products.

    Why: the ONNX exporters refuse adaptive pooling whose output size does not divide the input
    size (e.g. PSP's 3x3 and 6x6 bins on an 8x8 map), and a student must export at any input
    size. Bin ``i`` averages rows ``[floor(i*h/b), ceil((i+1)*h/b))`` exactly as PyTorch does.

    x: (B, C, h, w) -> (B, C, bins, bins)
    """
    ph = _pool_matrix(x.shape[-2], bins, x)  # (bins, h)
    pw = _pool_matrix(x.shape[-1], bins, x)  # (bins, w)
    return torch.matmul(torch.matmul(ph, x), pw.t())  # (B, C, bins, w) -> (B, C, bins, bins)


def _pool_matrix(size: int, bins: int, like: Tensor) -> Tensor:
    """(bins, size) row-stochastic matrix: row i is uniform over bin i's input positions."""
    i = torch.arange(bins, device=like.device)
    start = torch.div(i * size, bins, rounding_mode="floor")  # (bins,)
    end = torch.div((i + 1) * size + bins - 1, bins, rounding_mode="floor")  # ceil division
    pos = torch.arange(size, device=like.device)  # (size,)
    inside = (pos.unsqueeze(0) >= start.unsqueeze(1)) & (pos.unsqueeze(0) < end.unsqueeze(1))
    weights = inside.to(like.dtype)  # (bins, size)
    return weights / weights.sum(dim=1, keepdim=True)

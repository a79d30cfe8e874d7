"""Models: SampleConvNet for MNIST (as in the Opacus example) and a small CelebA CNN.

Neither uses BatchNorm, which mixes examples in a batch and so breaks
per-example privacy; Opacus's ModuleValidator accepts both as they are.
The options (channels, classes, image size, activation) default to the
original models: parameters are created in the same order, so a seed gives
the same initial weights as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpvision.models.layers import WSConv2d, make_activation

SAMPLE_CONVNET_MIN_SIZE = 14  # smallest square input whose feature map after conv2 + pool is >= 1x1


def sample_convnet_feature_size(image_size: int) -> int:
    """Side of SampleConvNet's last feature map for ``image_size`` inputs (4 for 28x28 MNIST).

    conv1 (k8, s2, p3): H -> H // 2; pool (2, 1): -1; conv2 (k4, s2): h -> (h - 4) // 2 + 1; pool: -1.
    """
    return (image_size // 2 - 5) // 2


class SampleConvNet(nn.Module):
    """The CNN of Opacus's MNIST example: two conv layers, two fully connected layers.

    Other square sizes (>= 14) adapt ``fc1`` to the final feature map (32 x s x s,
    see :func:`sample_convnet_feature_size`); 28x28 gives the original 512 inputs.

    Example:
        >>> SampleConvNet()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> SampleConvNet(in_channels=3, num_classes=2, image_size=32)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 2])
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 activation: str = "relu") -> None:
        super().__init__()
        side = sample_convnet_feature_size(image_size)
        if side < 1:
            raise ValueError(f"SampleConvNet needs images of at least {SAMPLE_CONVNET_MIN_SIZE}x"
                             f"{SAMPLE_CONVNET_MIN_SIZE}, got {image_size}")
        self.act = make_activation(activation)  # no parameters: the init order below is unchanged
        self.conv1 = nn.Conv2d(in_channels, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * side * side, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, 28, 28] (shapes for MNIST)
        x = self.act(self.conv1(x))  # [B, 16, 14, 14]
        x = F.max_pool2d(x, 2, 1)  # [B, 16, 13, 13]
        x = self.act(self.conv2(x))  # [B, 32, 5, 5]
        x = F.max_pool2d(x, 2, 1)  # [B, 32, 4, 4]
        x = x.flatten(1)  # [B, 512]
        x = self.act(self.fc1(x))  # [B, 32]
        return self.fc2(x)  # [B, num_classes]


class CelebaCNN(nn.Module):
    """A small CNN for 64x64 RGB faces, with GroupNorm instead of BatchNorm.

    Four conv-GroupNorm-activation-maxpool blocks and a global average pool, so
    any image size >= 16 works. ``weight_standardization`` swaps the convs for
    :class:`~dpvision.models.layers.WSConv2d` (same parameters, same init).

    Example:
        >>> CelebaCNN()(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 2])
    """

    def __init__(self, num_classes: int = 2, width: int = 32, groups: int = 8, *, in_channels: int = 3,
                 activation: str = "relu", weight_standardization: bool = False) -> None:
        super().__init__()
        conv = WSConv2d if weight_standardization else nn.Conv2d

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                conv(c_in, c_out, 3, padding=1),
                nn.GroupNorm(groups, c_out),
                make_activation(activation),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(in_channels, width),  # [B, w, 32, 32]
            block(width, 2 * width),  # [B, 2w, 16, 16]
            block(2 * width, 2 * width),  # [B, 2w, 8, 8]
            block(2 * width, 4 * width),  # [B, 4w, 4, 4]
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 3, 64, 64]; global average pooling makes the head size-independent.
        x = self.features(x)  # [B, 4w, H/16, W/16]
        x = x.mean(dim=(2, 3))  # [B, 4w]
        return self.head(x)  # [B, num_classes]

"""Models: SampleConvNet for MNIST (as in the Opacus example) and a small CelebA CNN.

Neither uses BatchNorm, which mixes examples in a batch and so breaks
per-example privacy; Opacus's ModuleValidator accepts both as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SampleConvNet(nn.Module):
    """The CNN of Opacus's MNIST example: two conv layers, two fully connected layers.

    Example:
        >>> SampleConvNet()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, 1, 28, 28]
        x = F.relu(self.conv1(x))  # [B, 16, 14, 14]
        x = F.max_pool2d(x, 2, 1)  # [B, 16, 13, 13]
        x = F.relu(self.conv2(x))  # [B, 32, 5, 5]
        x = F.max_pool2d(x, 2, 1)  # [B, 32, 4, 4]
        x = x.flatten(1)  # [B, 512]
        x = F.relu(self.fc1(x))  # [B, 32]
        return self.fc2(x)  # [B, 10]


class CelebaCNN(nn.Module):
    """A small CNN for 64x64 RGB faces, with GroupNorm instead of BatchNorm.

    Example:
        >>> CelebaCNN()(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 2])
    """

    def __init__(self, num_classes: int = 2, width: int = 32, groups: int = 8) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.GroupNorm(groups, c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(3, width),  # [B, w, 32, 32]
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

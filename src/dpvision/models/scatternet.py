"""ScatterNet models of Tramèr & Boneh (ICLR 2021, "Differentially Private Learning Needs Better Features").

A fixed scattering transform (:class:`~dpvision.models.scattering.Scattering2D`, J=2, L=8: 81
channels per input channel at H/4 x W/4) feeds a small trainable head. The features are
normalised per example by a GroupNorm without affine parameters (``input_norm="group"``, the
default: their data-independent normalisation, so it costs no privacy; the paper searched 9, 27 and
81 groups, ``NORM_GROUPS``), or per channel by statistics of the training set released under DP
before training (``input_norm="private"``, their best MNIST and CIFAR-10 results;
:mod:`dpvision.models.input_norm`).

* :class:`ScatterNetCNN`: their CNN on scattering features. Grayscale inputs get their MNIST
  head (conv3x3/2 16, conv3x3 32, linear 32, linear), colour inputs their CIFAR-10 head
  (conv3x3 64, max-pool, conv3x3 64, linear). Tanh activations by default, as in the paper.
* :class:`ScatterNetLinear`: a linear classifier on the normalised features.

Only the head has parameters: per-sample gradients (Opacus's hooks, vmap, or the fast
engine's manual backend) never look inside the scattering. Both models declare the scattering as their
frozen prefix (``frozen_prefix()``; :class:`dpvision.jobs.features.FrozenPrefix`): the training job computes
those features once per split and, while ``takes_features`` is true, ``forward`` takes them in place of
images (the normalisation, cheap, still runs at every step).
"""

from __future__ import annotations

import torch
from torch import nn

from dpvision.models.input_norm import make_input_norm
from dpvision.models.layers import make_activation
from dpvision.models.scattering import Scattering2D, scattering_channels

SCATTER_J, SCATTER_L = 2, 8  # 81 channels per input channel at 1/4 of the resolution
NORM_GROUPS = 27  # GroupNorm groups on the scattering features (81 C channels; 27 divides them)


def scatter_side(image_size: int) -> int:
    """Side of the scattering feature map for ``image_size`` inputs (7 for 28, 8 for 32)."""
    return image_size // 2 ** SCATTER_J


def scatternet_linear_features(in_channels: int, image_size: int) -> int:
    """Inputs of ScatterNetLinear's classifier: 81 C (H/4)^2 (3969 for MNIST)."""
    return scattering_channels(SCATTER_J, SCATTER_L) * in_channels * scatter_side(image_size) ** 2


class ScatterNetCNN(nn.Module):
    """Scattering -> GroupNorm (no affine) or fixed per-channel standardisation -> Tramèr & Boneh's CNN (MNIST head for 1 channel, else CIFAR-10).

    Example:
        >>> ScatterNetCNN()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
        >>> ScatterNetCNN(in_channels=3, image_size=32)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 activation: str = "tanh", input_norm: str = "group") -> None:
        super().__init__()
        self.scattering = Scattering2D(image_size, J=SCATTER_J, L=SCATTER_L)
        k, s = scattering_channels(SCATTER_J, SCATTER_L) * in_channels, scatter_side(image_size)
        self.norm = make_input_norm(input_norm, k, NORM_GROUPS)
        if in_channels == 1:  # MNIST: [B, 81, 7, 7] -> [B, 16, 4, 4] -> [B, 32, 4, 4]
            side = (s + 1) // 2
            self.features = nn.Sequential(
                nn.Conv2d(k, 16, 3, 2, padding=1), make_activation(activation),
                nn.Conv2d(16, 32, 3, 1, padding=1), make_activation(activation),
            )
            self.classifier = nn.Sequential(
                nn.Linear(32 * side * side, 32), make_activation(activation), nn.Linear(32, num_classes))
        else:  # CIFAR-10: [B, 243, 8, 8] -> [B, 64, 8, 8] -> [B, 64, 4, 4]
            side = s // 2
            self.features = nn.Sequential(
                nn.Conv2d(k, 64, 3, padding=1), make_activation(activation), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), make_activation(activation),
            )
            self.classifier = nn.Linear(64 * side * side, num_classes)

    takes_features = False  # True: forward takes frozen_prefix()'s features (the job's cache)

    def frozen_prefix(self) -> nn.Module:
        """The fixed leading part: images [B, C, H, W] -> scattering features [B, 81 C, H/4, W/4].

        The normalisation stays in the head: a private one's statistics are set after the model is built
        (or restored from a checkpoint on resume), and cached features must never hold stale ones."""
        return self.scattering

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] images, or their features [B, 81 C, H/4, W/4] while takes_features
        if not self.takes_features:
            x = self.scattering(x)  # [B, 81 C, H/4, W/4]
        x = self.norm(x)
        x = self.features(x).flatten(1)  # [B, c s s]
        return self.classifier(x)  # [B, num_classes]


class ScatterNetLinear(nn.Module):
    """Scattering -> GroupNorm (no affine) or fixed per-channel standardisation -> one linear layer.

    Example:
        >>> ScatterNetLinear()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 input_norm: str = "group") -> None:
        super().__init__()
        self.scattering = Scattering2D(image_size, J=SCATTER_J, L=SCATTER_L)
        k = scattering_channels(SCATTER_J, SCATTER_L) * in_channels
        self.norm = make_input_norm(input_norm, k, NORM_GROUPS)
        self.classifier = nn.Linear(scatternet_linear_features(in_channels, image_size), num_classes)

    takes_features = False  # True: forward takes frozen_prefix()'s features (the job's cache)

    def frozen_prefix(self) -> nn.Module:
        """The fixed leading part: images [B, C, H, W] -> scattering features [B, 81 C, H/4, W/4].

        The normalisation stays in the head: a private one's statistics are set after the model is built
        (or restored from a checkpoint on resume), and cached features must never hold stale ones."""
        return self.scattering

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] images, or their features [B, 81 C, H/4, W/4] while takes_features
        if not self.takes_features:
            x = self.scattering(x)  # [B, 81 C, H/4, W/4]
        x = self.norm(x)
        return self.classifier(x.flatten(1))  # [B, num_classes]

"""Images kept as uint8 tensors and normalised when they are used.

Keeping the raw bytes (a quarter of float32's memory) lets a whole dataset sit
on the device; normalising on the fly costs one fused multiply-add.

Normalisation never looks at the data being trained on: a mean/std computed from
the private training set would be a release outside ε (docs/privacy.md,
"Normalisation"). Datasets without published constants (an image folder, CelebA)
use :func:`neutral_stats`, ``(x - 0.5) / 0.5``, which maps 0..255 to [-1, 1]
whatever the images are, for DP and non-DP runs alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

#: The data-independent per-channel statistics of every dataset without published constants.
NEUTRAL_MEAN = 0.5
NEUTRAL_STD = 0.5


def neutral_stats(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of :data:`NEUTRAL_MEAN` / :data:`NEUTRAL_STD` for ``channels`` channels.

    Example:
        >>> neutral_stats(3)
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    """
    return (NEUTRAL_MEAN,) * channels, (NEUTRAL_STD,) * channels


@dataclass(frozen=True)
class ImageTensors:
    """A labelled image set: ``images`` uint8 [N, C, H, W], ``labels`` int64 [N].

    ``mean`` and ``std`` are per-channel constants on the 0..1 scale, used to
    normalise: ``(images / 255 - mean) / std``; every std must be positive and finite.
    They are fixed numbers (published ones, or :func:`neutral_stats`), never computed
    from the images at run time.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [N] = [{self.images.shape[0]}], got {tuple(self.labels.shape)}")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values, got {self.mean} and {self.std}")
        for c, (mean, std) in enumerate(zip(self.mean, self.std)):  # std divides every pixel: 0 gives NaN losses
            if not math.isfinite(mean):
                raise ValueError(f"the normalisation mean of channel {c} must be a finite number, got {mean}")
            if not (math.isfinite(std) and std > 0):
                raise ValueError(f"the normalisation std of channel {c} must be a positive finite number, got {std}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: torch.Tensor) -> "ImageTensors":
        return ImageTensors(self.images[indices], self.labels[indices], self.mean, self.std)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] on any device -> float32 normalised [B, C, H, W]."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std on the 0..1 scale of uint8 [N, C, H, W], exactly.

    A description of the data, never used to normalise it (that would be a release outside ε).

    Counting each of the 256 values per channel keeps memory small and the sums exact
    (``celeba.preprocessing.channel_stats`` computes them with numpy: equal up to rounding in the last bits).

    Example:
        >>> channel_stats(torch.tensor([[[[0, 255]], [[51, 51]]]], dtype=torch.uint8))
        ((0.5, 0.2), (0.5, 0.0))
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"channel_stats needs uint8 [N, C, H, W] with N >= 1, got {images.dtype} "
                         f"{tuple(images.shape)}")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1).long(), minlength=256).to(torch.float64)  # [256]
        n = hist.sum()
        mean = float((hist * values).sum() / n)
        means.append(mean)
        stds.append(float(torch.sqrt((hist * (values - mean) ** 2).sum() / n)))
    return tuple(means), tuple(stds)


class NormalizedTensorDataset(Dataset):
    """A map-style dataset over ``ImageTensors`` yielding ``(float image [C, H, W], label)``.

    Each item is normalised exactly as torchvision's ``ToTensor()`` followed by
    ``Normalize(mean, std)`` would do it.
    """

    def __init__(self, data: ImageTensors) -> None:
        self.data = data
        self._mean = torch.tensor(data.mean).view(-1, 1, 1)
        self._std = torch.tensor(data.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.data.images.is_floating_point():  # a model's cached features (dpvision.jobs.features): as they are
            return self.data.images[index], int(self.data.labels[index])
        image = self.data.images[index].float().div_(255.0)
        return (image - self._mean) / self._std, int(self.data.labels[index])

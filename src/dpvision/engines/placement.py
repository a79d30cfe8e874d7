"""Where the fast engine's data lives and how its batches are drawn.

* :class:`DeviceData`: the training set on the device as uint8 [n, C, H, W] (4x smaller than
  float32), normalised chunk by chunk exactly as ``ImageTensors.normalize``. Distributed under DP,
  a rank holds only its shard ``rank::W`` (:mod:`dpvision.engines.distributed`); without DP every
  rank holds the whole set (its slice of a shuffled global batch can be anywhere).
* :class:`PoissonSampler`: each step includes each example independently with probability q,
  drawn for a block of steps at once on the device from the engine's sampling generator.
* :func:`engine_generators`: the engine's named, seeded generators (saved with its state).
"""

from __future__ import annotations

import torch

from dpvision.data.tensors import ImageTensors
from dpvision.engines.distributed import DistContext, shard_indices
from dpvision.seeding import make_generator


class DeviceData:
    """The training images (uint8) and labels on ``device``: all of them, or this rank's shard."""

    def __init__(self, data: ImageTensors, device: torch.device, *, shard: torch.Tensor | None = None,
                 channels_last: bool = False) -> None:
        images, labels = (data.images, data.labels) if shard is None else (data.images[shard], data.labels[shard])
        self.images = images.to(device)  # uint8 [n, C, H, W], n = N or this rank's shard
        self.labels = labels.to(device)  # int64 [n]
        self.shard = shard  # global index of local example i (None: the identity)
        self.channels_last = channels_last
        self._mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float images [b, C, H, W], labels [b]) of local indices ``idx`` [b]."""
        return self.normalize(self.images[idx]), self.labels[idx]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float, exactly as ``ImageTensors.normalize``; float rows (a model's cached
        features, :mod:`dpvision.jobs.features`) are already the model's input and pass unchanged."""
        if images.is_floating_point():
            return images
        return self.standardize(images.float().div_(255.0))

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """float images [..., C, H, W] on the 0..1 scale (augmented views) -> the model's input."""
        x = (x - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @classmethod
    def for_run(cls, data: ImageTensors, dist: DistContext, *, dp: bool, channels_last: bool) -> "DeviceData":
        """Distributed DP: this rank's shard only (local index i is example shard[i]); else the whole set."""
        shard = None
        if dist.is_distributed and dp:
            shard = shard_indices(len(data), rank=dist.rank, world_size=dist.world_size)
        return cls(data, dist.device, shard=shard, channels_last=channels_last)


class PoissonSampler:
    """Poisson sampling at rate q: ``draw(steps, n)`` -> bool [steps, n], True = included at that step.

    Every draw advances ``generator`` (the engine's sampling generator, saved in checkpoints), so the
    real examples and the audit's canaries are sampled from one stream.
    """

    def __init__(self, sample_rate: float, generator: torch.Generator) -> None:
        self.sample_rate = sample_rate
        self.generator = generator

    def draw(self, steps: int, n: int) -> torch.Tensor:
        return torch.rand(steps, n, generator=self.generator, device=self.generator.device) < self.sample_rate


def engine_generators(seed: int, dist: DistContext, *, augment: bool) -> dict[str, torch.Generator]:
    """The fast engine's generators by name, on ``dist.device``, one seeded stream each.

    ``sampling`` is this rank's own stream (the shards are sampled independently); ``data_order``
    is shared (one global shuffled order without DP); ``noise`` is drawn from by rank 0 only.
    """
    dev = dist.device
    generators = {"sampling_generator": make_generator(seed, dist.stream("sampling"), dev),
                  "data_order_generator": make_generator(seed, "data_order", dev),
                  "noise_generator": make_generator(seed, "noise", dev)}
    if augment:
        generators["augment_generator"] = make_generator(seed, dist.stream("augment"), dev)
    return generators

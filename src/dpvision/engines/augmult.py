"""Augmentation multiplicity (De et al. 2022): K augmentations of each example, one clipped gradient.

For a sampled example x_i the per-example gradient is the average over K random augmentations,

    g_i = (1/K) sum_k grad loss(aug_k(x_i)) = grad [ (1/K) sum_k loss(aug_k(x_i)) ],

and g_i is what gets clipped to C. An example still contributes one clipped vector of norm <= C
to the sum, so the sensitivity, the noise σC and the accountant are exactly those of plain
DP-SGD: augmentation multiplicity changes the signal, never the privacy.

The augmentations are the standard ones for small images: a random crop after reflect-padding
by ``PAD`` pixels, and a random horizontal flip where the dataset allows it (not for digits).
They are drawn on the device from the engine's own ``augment`` generator (saved in checkpoints).

Two exact ways to the clipped sum, the same numbers up to rounding (tests/test_augmult_manual.py):

* :class:`AugmultManual` (chosen when the manual backend supports every layer): the model runs once on the
  B K views; each layer's per-example gradient is formed with the example's K views as more rows of that
  example (:mod:`dpvision.engines.ghost`: for a conv, the sum over views and positions of patches x output
  gradients; a Linear, the sum over views; GroupNorm, its per-view sums added), the factor of the mean
  gradient's norm is applied once per example, and the sum is taken by book-keeping. No per-view gradient
  is ever formed, and a chunk's memory is that of its B K views' activations.
* :class:`AugmultPerSample`: ``torch.func`` vmap over examples of the gradient of the mean loss over the K
  views; any model vmap supports (dropout included), K per-view activations inside each vmapped call.

Example:
    >>> import torch
    >>> x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    >>> out = augment(x, k=3, flip=True, generator=torch.Generator().manual_seed(0))
    >>> out.shape
    torch.Size([2, 3, 1, 4, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dpvision.engines.clipping import ClipFn
from dpvision.engines.per_sample import ManualPerSample, VmapPerSample

PAD = 4  # pixels of reflect padding before the random crop (the usual CIFAR recipe)
AUGMENTATIONS = ("crop", "crop_flip")


def augment(x: torch.Tensor, *, k: int, flip: bool, generator: torch.Generator, pad: int = PAD) -> torch.Tensor:
    """[P, C, H, W] -> [P, K, C, H, W]: K random crops (and flips) of each image."""
    p, c, h, w = x.shape
    pad = min(pad, h - 1, w - 1)  # reflect padding needs pad < size
    if pad == 0 and not flip:
        return x.unsqueeze(1).expand(p, k, c, h, w)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # [P, C, H + 2 pad, W + 2 pad]
    n = p * k
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)  # crop offsets
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # [n, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # [n, 1, W]
    if flip:  # a flipped crop reads its columns right to left
        mirrored = torch.rand(n, generator=generator, device=dev) < 0.5
        cols = torch.where(mirrored[:, None, None], cols.flip(-1), cols)
    source = torch.arange(n, device=dev) // k  # view v of example i is row i K + v; no copies of the images
    crops = padded[source[:, None, None], :, rows, cols]  # [n, H, W, C]
    return crops.permute(0, 3, 1, 2).reshape(p, k, c, h, w)


class AugmultManual(ManualPerSample):
    """The manual backend on the K views of every example (:class:`~dpvision.engines.per_sample.ManualPerSample`
    with ``views`` = K): the per-example gradient of the mean loss over the views, clipped and summed."""

    def __init__(self, model: nn.Module, *, k: int, flip: bool, generator: torch.Generator, pad: int = PAD) -> None:
        if k < 1:
            raise ValueError(f"augmult needs K >= 1, got {k}")
        super().__init__(model)  # on CUDA its keep budget holds a large model's per-example gradients (manual.py)
        self.views, self.flip, self.generator, self.pad = k, flip, generator, pad

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, clip: ClipFn,
                   acc_views: list[torch.Tensor], loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        """``acc += sum_i w_i clip(||g_i||) g_i`` with g_i averaged over K augmentations of x_i [P, C, H, W]."""
        views = augment(x, k=self.views, flip=self.flip, generator=self.generator, pad=self.pad)  # [P, K, C, H, W]
        # The crops come out channels-last (gathered per pixel): give the model x's own memory format.
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        views = views.flatten(0, 1).contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        super().accumulate(views, y, w, clip, acc_views, loss_sum, correct)  # views [P K, C, H, W]


class AugmultPerSample(VmapPerSample):
    """Per-example gradients averaged over K augmentations, clipped and summed (``torch.func``): the vmap
    backend with each example's loss the mean over its K views, g_i = grad (1/K) sum_k loss(aug_k(x_i))."""

    name = "augmult"

    def __init__(self, model: nn.Module, *, k: int, flip: bool, generator: torch.Generator, pad: int = PAD) -> None:
        if k < 1:
            raise ValueError(f"augmult needs K >= 1, got {k}")
        self.k, self.flip, self.generator, self.pad = k, flip, generator, pad
        super().__init__(model)

    @staticmethod
    def example_loss(model: nn.Module, buffers: dict):
        """One example's mean loss over its K views as a function of the parameters; xs [K, C, H, W], y []."""
        def loss_group(params: dict, xs: torch.Tensor, y: torch.Tensor):
            logits = functional_call(model, (params, buffers), (xs,))  # [K, classes]
            loss = F.cross_entropy(logits, y.expand(len(xs)))  # the mean over the K augmentations
            return loss, (loss.detach(), logits.detach().mean(0))
        return loss_group

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """[P, C, H, W] -> [P, K, C, H, W]: the K views of each example, from the engine's augment generator."""
        return augment(x, k=self.k, flip=self.flip, generator=self.generator, pad=self.pad)

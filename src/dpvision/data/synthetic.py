"""Labelled images drawn from random processes, with no real data: a prior that costs no privacy.

Tang et al. ("Differentially Private Image Classification by Learning Priors from Random Processes",
NeurIPS 2023) and Baradad et al. ("Learning to See by Looking at Noise", NeurIPS 2021) pretrain on images
from random processes, then train on the private data with DP-SGD. Two families of processes are drawn
here, both among Baradad et al.'s best:

* **dead leaves**: opaque shapes (discs or squares) of random colours dropped on top of each other, radii
  from a power law ``p(r) ∝ r^-3`` (scale invariance, like natural images' occlusions);
* **spectral noise**: Gaussian noise shaped in Fourier space to a ``1 / f^α`` amplitude spectrum (natural
  images have α ≈ 1 to 2), with random colour mixing across channels.

**The pretext task is supervised**: the label says which process and which parameter bucket drew the
image (:data:`CLASS_NAMES`: small or large leaves, discs or squares, rough or smooth spectra), so the
ordinary ``dpvision train`` job (cross-entropy) pretrains on it unchanged. Tang et al. and Baradad et al.
use a representation loss (contrastive learning) instead: ``optim.objective: contrastive``
(:mod:`dpvision.engines.contrastive`) ignores the labels and learns from two views of each image. Either
way the last layer (classifier or projection) is thrown away when the weights initialise the private model.

Everything is vectorised torch on the CPU and seeded by one ``torch.Generator`` (no global randomness),
at any image size and channel count; it reads no file and needs no network. Example:

    >>> data = generate(12, image_size=16, channels=3, seed=0)
    >>> data.images.shape, data.images.dtype, data.labels.bincount().tolist()
    (torch.Size([12, 3, 16, 16]), torch.uint8, [2, 2, 2, 2, 2, 2])
"""

from __future__ import annotations

import math

import torch

from dpvision.data.tensors import ImageTensors, channel_stats

CLASS_NAMES = ("leaves_discs_small", "leaves_discs_large", "leaves_squares_small", "leaves_squares_large",
               "spectrum_rough", "spectrum_smooth")
LEAVES = 48  # shapes per dead-leaves image (the last ones dropped are on top)
RADIUS = {"small": (0.02, 0.12), "large": (0.10, 0.45)}  # as fractions of the image side
ALPHA = {"rough": (0.5, 1.25), "smooth": (1.5, 2.5)}  # amplitude spectrum exponent of 1 / f^alpha
CHUNK = 256  # images rendered at once: [CHUNK, LEAVES, H, W] masks, 48 MiB at 64x64
MAX_IMAGES, MAX_SIZE, MAX_CHANNELS = 1_000_000, 512, 16


def _uniform(n: int, low: float, high: float, gen: torch.Generator, *shape: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, *shape, generator=gen)


def _power_law_radius(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """[n, LEAVES] radii with density ∝ r^-3 on [low, high] (inverse of the CDF of r^-2)."""
    u = torch.rand(n, LEAVES, generator=gen)
    return (low ** -2 - u * (low ** -2 - high ** -2)) ** -0.5


def dead_leaves(n: int, size: int, channels: int, *, squares: bool, radius: tuple[float, float],
                gen: torch.Generator) -> torch.Tensor:
    """float [n, channels, size, size] in [0, 1]: LEAVES shapes of random colours, the later ones on top."""
    out = torch.empty(n, channels, size, size)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in [0, 1]
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        centre = torch.rand(m, LEAVES, 2, generator=gen)  # [m, L, (y, x)]
        r = _power_law_radius(m, *radius, gen)  # [m, L]
        colour = torch.rand(m, LEAVES + 1, channels, generator=gen)  # index 0: the background
        dy = grid.view(1, 1, size, 1) - centre[..., 0, None, None]  # [m, L, size, 1]
        dx = grid.view(1, 1, 1, size) - centre[..., 1, None, None]  # [m, L, 1, size]
        if squares:
            inside = torch.maximum(dy.abs(), dx.abs()) <= r[..., None, None]
        else:
            inside = dy ** 2 + dx ** 2 <= r[..., None, None] ** 2  # [m, L, size, size]
        order = torch.arange(1, LEAVES + 1).view(1, LEAVES, 1, 1)
        top = (inside * order).amax(dim=1)  # [m, size, size]: the last leaf covering each pixel (0: none)
        picked = torch.gather(colour, 1, top.view(m, -1, 1).expand(-1, -1, channels))  # [m, size*size, C]
        out[start:start + m] = picked.view(m, size, size, channels).permute(0, 3, 1, 2)
    return out


def spectral_noise(n: int, size: int, channels: int, *, alpha: tuple[float, float],
                   gen: torch.Generator) -> torch.Tensor:
    """float [n, channels, size, size] in [0, 1]: 1 / f^alpha noise (alpha per image), colours mixed."""
    fy = torch.fft.fftfreq(size).view(size, 1)
    fx = torch.fft.rfftfreq(size).view(1, size // 2 + 1)
    freq = torch.sqrt(fy ** 2 + fx ** 2).clamp_min(1.0 / size)  # [size, size//2+1]; no infinite DC term
    a = _uniform(n, *alpha, gen).view(n, 1, 1, 1)
    real = torch.randn(n, channels, size, size // 2 + 1, generator=gen)
    imag = torch.randn(n, channels, size, size // 2 + 1, generator=gen)
    fields = torch.fft.irfft2(torch.complex(real, imag) * freq.pow(-a), s=(size, size))  # [n, C, H, W]
    mix = torch.randn(n, channels, channels, generator=gen) / math.sqrt(channels)  # random colours
    fields = torch.einsum("ncd,ndhw->nchw", mix, fields)
    low = fields.amin(dim=(1, 2, 3), keepdim=True)
    high = fields.amax(dim=(1, 2, 3), keepdim=True)
    return (fields - low) / (high - low).clamp_min(1e-12)


def _draw(label: int, n: int, size: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    name = CLASS_NAMES[label]
    if name.startswith("leaves"):
        return dead_leaves(n, size, channels, squares="squares" in name, radius=RADIUS[name.rsplit("_", 1)[1]],
                           gen=gen)
    return spectral_noise(n, size, channels, alpha=ALPHA[name.rsplit("_", 1)[1]], gen=gen)


def _check(n: int, image_size: int, channels: int) -> None:
    for name, value, low, high in (("n", n, 1, MAX_IMAGES), ("image_size", image_size, 4, MAX_SIZE),
                                   ("channels", channels, 1, MAX_CHANNELS)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"synthetic images: {name} must be an integer in [{low}, {high}], got {value!r}")


def generate(n: int, *, image_size: int = 32, channels: int = 3, seed: int = 0,
             stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> ImageTensors:
    """``n`` images, ``n // 6`` or one more per class of :data:`CLASS_NAMES`, in a seeded random order.

    ``stats``: the (mean, std) to normalise with (default: these images' own, exactly).
    """
    _check(n, image_size, channels)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASS_NAMES)
    labels = labels[torch.randperm(n, generator=gen)]
    images = torch.empty(n, channels, image_size, image_size, dtype=torch.uint8)
    for label in range(len(CLASS_NAMES)):  # one vectorised draw per class
        where = (labels == label).nonzero().flatten()
        if len(where):
            pixels = _draw(label, len(where), image_size, channels, gen)
            images[where] = (pixels * 255).round_().clamp_(0, 255).to(torch.uint8)
    mean, std = stats or channel_stats(images)
    std = tuple(max(s, 1e-3) for s in std)  # a flat channel must not divide by zero
    return ImageTensors(images, labels.to(torch.int64), tuple(mean), std)


def load_synthetic(*, n_train: int = 50_000, n_test: int = 10_000, image_size: int = 32, channels: int = 3,
                   seed: int = 0) -> tuple[ImageTensors, ImageTensors, tuple[str, ...]]:
    """Train and test sets from independent streams (seeds ``2 seed`` and ``2 seed + 1``), both with the
    train set's mean/std (as every loader in ``dpvision.data.registry``), and the class names."""
    train = generate(n_train, image_size=image_size, channels=channels, seed=2 * seed)
    test = generate(n_test, image_size=image_size, channels=channels, seed=2 * seed + 1,
                    stats=(train.mean, train.std))
    return train, test, CLASS_NAMES

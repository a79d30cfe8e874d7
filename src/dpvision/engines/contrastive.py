"""A contrastive objective (SimCLR's NT-Xent) for pretraining without privacy, on synthetic or public images.

Tang et al. (NeurIPS 2023) and Baradad et al. (NeurIPS 2021) learn their prior from images of random
processes with a contrastive loss (Chen et al., "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020): two strongly augmented views of every image, the network's outputs pulled
together for the two views of one image and pushed apart from every other view in the chunk.

The loss couples the examples of a batch (each one's negatives are the others), so there is no
per-example gradient to clip: it is for pretraining with DP off only (``optim.objective: contrastive``
with ``dp.enabled: false``; the job refuses it under DP). The weights it learns are then a
``model.init`` for DP-SGD on the private data, the head reset (``model.init_head: reset``).

* :func:`views`: two views [2, b, C, H, W] of every image: a random resized crop (area 20-100%, aspect
  3/4-4/3, a side clamped to the image's, bilinear), a random horizontal flip (not for digits), with
  probability 0.8 a colour jitter (brightness, contrast, saturation, each a factor in [0.6, 1.4]; SimCLR's
  CIFAR strength 0.5 without its hue shift) and with probability 0.2 grey; all on the device from one generator.
* :func:`nt_xent`: the summed loss and the number of views whose nearest other view is their partner.
* :func:`evaluate`: the mean loss and that "pair accuracy" on a split, views drawn from a fixed seed.

A step's negatives are the other views of its whole batch: the engine runs a contrastive step as one chunk
(``optim.batch_size`` at most ``MAX_BATCH``) in one process, so the loss does not depend on chunk sizes.

The model's output layer is the projection (``PROJECTION_DIM`` outputs instead of the classes).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> v = views(torch.rand(3, 3, 8, 8), generator=g)
    >>> v.shape, bool(v.min() >= 0), bool(v.max() <= 1)
    (torch.Size([2, 3, 3, 8, 8]), True, True)
    >>> z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]])  # 2 images x 2 views that agree
    >>> loss, correct = nt_xent(z, temperature=0.5)
    >>> float(correct)
    2.0
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dpvision.data.tensors import ImageTensors
from dpvision.seeding import make_generator

OBJECTIVES = ("cross_entropy", "contrastive")
PROJECTION_DIM = 128  # outputs of the model's last layer under the contrastive objective (SimCLR: 128)
DEFAULT_TEMPERATURE = 0.5  # SimCLR's CIFAR-10 value
MAX_BATCH = 8192  # a step's batch is one chunk (its views are one another's negatives): 2 x 8,192 views coexist
CROP_AREA = (0.2, 1.0)  # of the image, as SimCLR's CIFAR-10 setting (ImageNet: 0.08)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER, JITTER_P, GREY_P = 0.4, 0.8, 0.2  # colour factors in [1 - JITTER, 1 + JITTER]
EVAL_SEED = 12345  # the evaluation's views: the same at every epoch, so the numbers compare


def resolve_temperature(temperature: float | None) -> float:
    """The temperature a run uses: the one given, else ``DEFAULT_TEMPERATURE``."""
    return DEFAULT_TEMPERATURE if temperature is None else float(temperature)


def _uniform(n: int, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def resized_crops(x: torch.Tensor, *, width: torch.Tensor, height: torch.Tensor, cx: torch.Tensor,
                  cy: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] -> each image's crop of ``width`` x ``height`` (fractions of its sides, [n]) centred at
    (``cx``, ``cy``) (in [-1, 1] image coordinates, [n]), mirrored where ``mirror`` [n] is True, resized
    bilinearly to H x W. Width = height = 1 at the centre is the image itself."""
    sign = torch.where(mirror, -1.0, 1.0)
    theta = torch.zeros(len(x), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width * sign, cx, height, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [n, H, W, 2]: where each output pixel reads
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _crops(x: torch.Tensor, g: torch.Generator, flip: bool) -> torch.Tensor:
    """[n, C, H, W] -> a random resized crop of each (area and aspect as SimCLR's; a side longer than the image
    is clamped to it), mirrored with probability 1/2 when ``flip``."""
    n, dev = len(x), x.device
    area = _uniform(n, *CROP_AREA, g, dev)
    ratio = torch.exp(_uniform(n, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), g, dev))
    w = torch.sqrt(area * ratio).clamp(max=1.0)  # width and height as fractions of the image side
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=g, device=dev) - 1)  # the crop stays inside the image
    cy = (1 - h) * (2 * torch.rand(n, generator=g, device=dev) - 1)
    mirror = torch.rand(n, generator=g, device=dev) < 0.5
    return resized_crops(x, width=w, height=h, cx=cx, cy=cy, mirror=mirror & flip)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """[n, C, H, W] -> its luma [n, 1, H, W] (ITU-R 601 weights for RGB; the mean otherwise)."""
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _colour(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation jitter (with probability JITTER_P), then grey (GREY_P), in [0, 1]."""
    n, dev = len(x), x.device
    on = (torch.rand(n, generator=g, device=dev) < JITTER_P).float().view(n, 1, 1, 1)
    factors = [1 + on * _uniform(n, -JITTER, JITTER, g, dev).view(n, 1, 1, 1) for _ in range(3)]
    x = (x * factors[0]).clamp(0, 1)  # brightness
    mean = _grey(x).mean(dim=(2, 3), keepdim=True)  # [n, 1, 1, 1]
    x = ((x - mean) * factors[1] + mean).clamp(0, 1)  # contrast
    grey = _grey(x)
    x = ((x - grey) * factors[2] + grey).clamp(0, 1)  # saturation
    to_grey = (torch.rand(n, generator=g, device=dev) < GREY_P).view(n, 1, 1, 1)
    return torch.where(to_grey, _grey(x).expand_as(x), x)


def views(x: torch.Tensor, *, generator: torch.Generator, flip: bool = True) -> torch.Tensor:
    """float [b, C, H, W] in [0, 1] -> [2, b, C, H, W]: two independent strong augmentations of each image
    (``flip`` False: never mirrored, for digits)."""
    both = torch.cat([x, x])  # [2b, C, H, W]: view v of image i is row v b + i
    return _colour(_crops(both, generator, flip), generator).view(2, *x.shape)


def nt_xent(z: torch.Tensor, *, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss over the b images, number of them whose views find each other), of outputs ``z`` [2b, d]
    whose rows i and i + b are the two views of image i.

    Each view's loss is the cross-entropy of its partner among the 2b - 1 other views by cosine similarity
    / ``temperature``; an image's loss is the mean over its two views (so the sum is over images, as the
    cross-entropy objective's). ``correct`` counts each view's nearest other view being its partner, halved.
    """
    n = len(z)
    b = n // 2
    z = F.normalize(z.float(), dim=1)
    sim = z @ z.T / temperature  # [2b, 2b]
    sim = sim.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), -math.inf)  # not itself
    partner = torch.arange(n, device=z.device).roll(b)  # i <-> i + b
    loss = F.cross_entropy(sim, partner, reduction="sum") / 2
    correct = (sim.argmax(1) == partner).sum() / 2
    return loss, correct


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageTensors, *, batch_size: int, device, temperature: float,
             flip: bool = True) -> tuple[float, float]:
    """(mean loss, pair accuracy) of ``model`` on ``data``: two views of every image, each batch of
    ``batch_size`` images its own set of negatives (as a training batch). The views are drawn on the CPU from
    a fixed seed, so every epoch and every device sees the same ones."""
    was_training = model.training
    model.eval()
    g = make_generator(EVAL_SEED, "contrastive_eval")  # CPU
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    total_loss = total_correct = 0.0
    for start in range(0, len(data), batch_size):
        x = data.images[start:start + batch_size].cpu().float() / 255  # [b, C, H, W] in [0, 1]
        v = (views(x, generator=g, flip=flip) - mean) / std  # [2, b, C, H, W]
        loss, correct = nt_xent(model(v.flatten(0, 1).to(device)), temperature=temperature)
        total_loss += float(loss)
        total_correct += float(correct)
    model.train(was_training)
    n = max(len(data), 1)
    return total_loss / n, (total_correct / n if len(data) else math.nan)

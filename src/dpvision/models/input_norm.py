"""Private input normalisation of scattering features (Tramèr & Boneh, ICLR 2021, their ``input_norm=BN``).

The ScatterNet models normalise their features either per example with a data-independent GroupNorm
(``"group"``, free in privacy) or per channel with an affine map fixed before training
(``"private"``, :class:`ChannelStandardize`): x -> (x - mean) / sqrt(var + ``EPS``), where mean and var
[K] are the channels' statistics over the TRAINING set, released with the Gaussian mechanism by
:func:`channel_statistics`:

1. each example i gives two vectors [K]: its channel means m_i (over the H/4 x W/4 positions) and its
   channel means of squares s_i;
2. under DP each vector is clipped to L2 norm <= ``bound`` (:func:`clip_rows`), so adding or removing
   one example moves each sum by at most ``bound``;
3. each sum gets Gaussian noise of std ``noise_multiplier * bound`` per coordinate, once, drawn from
   the run's seeded generator, and is divided by the public N: E[x] ~ sum m_i / N, E[x^2] ~ sum s_i / N;
4. var = max(E[x^2] - E[x]^2, 0) (the noise can make it negative), and ``EPS`` keeps the scale finite.

Two Gaussian releases of noise multiplier σ_norm on the whole training set: the ledger's entry
(σ_norm, q = 1, 2 steps) (:data:`RELEASES`; :func:`dpvision.privacy.plan.make_plan`). Without DP the
statistics are exact (no clipping, no noise). The statistics are buffers of the model, so
``model.pt`` and checkpoints carry them.

Example:
    >>> norm = ChannelStandardize(2)
    >>> norm.set_statistics(torch.tensor([1.0, -1.0]), torch.tensor([4.0, 0.0]))
    >>> norm(torch.ones(1, 2, 1, 1)).flatten().tolist()  # doctest: +ELLIPSIS
    [0.0, 632.4...]
"""

from __future__ import annotations

import torch
from torch import nn

INPUT_NORMS = ("group", "private")  # model.input_norm
RELEASES = 2  # Gaussian releases at q = 1: the channel means, then the channel means of squares
EPS = 1e-5  # added to the variance before the square root (BatchNorm's eps; the published code's)


class ChannelStandardize(nn.Module):
    """x [B, K, h, w] -> (x - mean) / sqrt(var + EPS) per channel; ``mean`` and ``var`` [K] are fixed buffers.

    Starts as the identity up to ``EPS`` (mean 0, var 1) until :meth:`set_statistics`; a checkpoint or
    ``model.pt`` restores them like any buffer. No parameters: nothing here is trained.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))

    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Fix the map to ``mean`` and ``var`` [K] (copied, in the buffers' dtype and device)."""
        self.mean.copy_(mean)
        self.var.copy_(var)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast [K] over [B, K, h, w]
        return (x - self.mean.view(shape)) * torch.rsqrt(self.var.view(shape) + EPS)


def make_input_norm(input_norm: str, channels: int, groups: int) -> nn.Module:
    """The features' normalisation: a GroupNorm of ``groups`` groups without affine (``"group"``) or a
    :class:`ChannelStandardize` (``"private"``)."""
    if input_norm == "group":
        return nn.GroupNorm(groups, channels, affine=False)
    if input_norm == "private":
        return ChannelStandardize(channels)
    raise ValueError(f"model.input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")


def clip_rows(rows: torch.Tensor, bound: float) -> torch.Tensor:
    """Each row of ``rows`` [B, K] scaled down to L2 norm <= ``bound`` (rows already within it unchanged).

    The factor is bound / max(norm, bound): exactly 1 inside the ball, so no row grows and none is
    divided by zero.

    Example:
        >>> clip_rows(torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]]), 1.0).tolist()
        [[0.6000000238418579, 0.800000011920929], [0.30000001192092896, 0.4000000059604645], [0.0, 0.0]]
    """
    norms = rows.norm(dim=1, keepdim=True)  # [B, 1]
    return rows * (bound / norms.clamp(min=bound))


def moment_sums(features: torch.Tensor, bound: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the batch of each example's channel means and channel means of squares ([K] each, float64).

    ``features`` [B, K, h, w]; ``bound``: each example's two vectors [K] clipped to it first (None: exact).
    """
    flat = features.detach().to(torch.float64).flatten(2)  # [B, K, h w]
    means, squares = flat.mean(dim=2), flat.square().mean(dim=2)  # [B, K] each
    if bound is not None:
        means, squares = clip_rows(means, bound), clip_rows(squares, bound)
    return means.sum(dim=0), squares.sum(dim=0)


@torch.no_grad()
def channel_statistics(features_of, batches, *, num_examples: int, noise_multiplier: float | None = None,
                       bound: float = 1.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, var)`` [K] (float64, CPU) of the channels of ``features_of(batch)`` [b, K, h, w] over ``batches``.

    ``batches`` yields the ``num_examples`` training inputs in pieces (bounded memory). With
    ``noise_multiplier`` σ the two sums are those of clipped vectors (``bound``) plus Gaussian noise
    of std σ ``bound`` per coordinate from ``generator`` (two Gaussian releases at q = 1); with None
    they are exact.
    """
    dp = noise_multiplier is not None
    total_means = total_squares = None
    seen = 0
    for batch in batches:
        sums = moment_sums(features_of(batch), bound if dp else None)
        total_means = sums[0] if total_means is None else total_means + sums[0]
        total_squares = sums[1] if total_squares is None else total_squares + sums[1]
        seen += len(batch)
    if seen != num_examples or total_means is None:
        raise ValueError(f"the input normalisation saw {seen} examples, expected {num_examples}")
    total_means, total_squares = total_means.cpu(), total_squares.cpu()
    if dp:
        std = noise_multiplier * bound
        total_means = total_means + std * torch.randn(total_means.shape, generator=generator, dtype=torch.float64)
        total_squares = total_squares + std * torch.randn(total_squares.shape, generator=generator,
                                                          dtype=torch.float64)
    mean, mean_square = total_means / num_examples, total_squares / num_examples
    return mean, (mean_square - mean.square()).clamp(min=0.0)


def fit_input_norm(model: nn.Module, train, *, batch_size: int, device, noise_multiplier: float | None = None,
                   bound: float = 1.0, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute ``model.norm``'s statistics on the training set ``train`` and return them.

    ``model`` has a ``scattering`` and a :class:`ChannelStandardize` ``norm`` (a ScatterNet model built
    with ``input_norm="private"``). ``train``: its ImageTensors, whose features are computed on ``device`` in
    batches of ``batch_size``; or, while ``model.takes_features``, the job's cached features of those images
    (:mod:`dpvision.jobs.features`: the same scattering's output, not computed again).
    """
    if not isinstance(getattr(model, "norm", None), ChannelStandardize):
        raise ValueError("model.input_norm private needs a ScatterNet model built with input_norm='private'")
    scattering = nn.Identity() if getattr(model, "takes_features", False) else model.scattering.to(device)

    def features_of(inputs: torch.Tensor) -> torch.Tensor:  # images [b, C, H, W] (or features) -> [b, K, H/4, W/4]
        return scattering(train.normalize(inputs.to(device)))

    batches = (train.images[i:i + batch_size] for i in range(0, len(train), batch_size))
    mean, var = channel_statistics(features_of, batches, num_examples=len(train), noise_multiplier=noise_multiplier,
                                   bound=bound, generator=generator)
    model.norm.set_statistics(mean, var)
    return mean, var

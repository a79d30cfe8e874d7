"""Per-example gradients of an affine LayerNorm: [B, D] sums over each example's tokens.

For input ``a`` [B, ..., *S] normalised over its last dims S (``normalized_shape``, D entries) and output
gradient ``dz`` of the same shape, example i's gradients are (Opacus's formula, sums over the example's
positions t, e.g. a ViT's T tokens)

    gamma_i = sum_t dz[i, t] * a_hat[i, t]        beta_i = sum_t dz[i, t]        ([D] each)

with a_hat = (a - mean) / sqrt(var + eps) over S, recomputed here from the saved input in float32 (float64
stays float64) whatever the forward ran in. Formed once, [B, D] each: the manual backend takes the norm of
exactly these tensors and sums exactly these tensors (no rounding chain between the two beyond the sum of
squares).

Example:
    >>> ln = nn.LayerNorm(4)
    >>> a, dz = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    >>> sq, (gw, gb) = layer_norm_norm_sq(ln, a, dz)
    >>> sq.shape, gw.shape, bool(torch.allclose(gb, dz.sum(1)))
    (torch.Size([3]), torch.Size([3, 4]), True)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpvision.engines.ghost import sum_sq


def layer_norm_grads(module: nn.LayerNorm, a: torch.Tensor,
                     dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(gamma [B, D], beta [B, D] or None without a bias) per-example gradients, float32 (or float64)."""
    dtype = torch.float64 if torch.float64 in (a.dtype, dz.dtype) else torch.float32
    a_hat = F.layer_norm(a.to(dtype), module.normalized_shape, None, None, module.eps)  # [B, ..., *S]
    b, d = len(a), module.weight.numel()
    dz = dz.to(dtype)
    gw = (dz * a_hat).reshape(b, -1, d).sum(1)  # [B, D]: summed over the example's positions
    gb = dz.reshape(b, -1, d).sum(1) if module.bias is not None else None
    return gw, gb


def layer_norm_norm_sq(module: nn.LayerNorm, a: torch.Tensor, dz: torch.Tensor, exact: bool = False):
    """([B] squared norms, (gamma, beta) per-example gradients) of an affine LayerNorm; ``exact``: the sums of
    squares in float64 (:func:`~dpvision.engines.ghost.sum_sq`)."""
    gw, gb = layer_norm_grads(module, a, dz)
    sq = sum_sq(gw, exact) if gb is None else sum_sq(gw, exact) + sum_sq(gb, exact)
    return sq, (gw, gb)

"""Per-layer rules of the manual backend: exact per-example gradient norms, then the clipped sum.

For a layer with input ``a`` and output gradient ``dz`` (each example's loss gradient with respect
to the layer's output, all from one batched backward), example i's weight gradient is

    g_i = G_i^T A_i    [p, d]

with A_i [T, d] the example's input rows (a Linear: its T input vectors; a Conv2d: its T = Ho Wo
unfolded patches, d = C_in kh kw) and G_i [T, p] its output gradients. Its squared norm, two ways,
both exact (they differ only by rounding):

* ``"materialise"``: form g_i (one batched product, T d p multiply-adds an example) and sum squares;
* ``"ghost"`` (Bu et al., NeurIPS 2022, "Scalable and Efficient Training of Large Convolutional
  Neural Networks with Differential Privacy"): ||G_i^T A_i||_F^2 = sum_{t,s} (A_i A_i^T)_{ts}
  (G_i G_i^T)_{ts}, two T x T Gram matrices, T^2 (d + p) multiply-adds an example.

:func:`choose_method` takes the cheaper by the layer's shapes: ghost when T (d + p) < d p, i.e. for
late, small-resolution, wide layers (WRN-16-4's 8x8 stage), materialise for early ones. Neither keeps
a per-example gradient beyond its own layer, in chunks of examples bounded by ``PATCH_BUDGET``.

The clipped sum needs no per-example gradient either (the book-keeping of Bu et al., ICML 2023,
"Differentially Private Optimization on Large Model at Small Cost"): with clip factors f [B],

    sum_i f_i g_i = sum_i f_i G_i^T A_i = (f * G)^T A

which is the layer's ordinary batch weight gradient with each example's output gradient scaled by
f_i: one ``aten.convolution_backward`` (cuDNN's weight-gradient kernel) for a Conv2d, one matrix
product for a Linear. GroupNorm's per-example gradients are [B, C] (sum over space of
``dz * a_hat`` and of ``dz``): formed once, used for both.

Every function takes ``compute_dtype`` (float32, or bfloat16 for mixed precision on CUDA): the
products run in it, norms are always reduced in float32 and results are returned in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GHOST, MATERIALISE = "ghost", "materialise"
METHODS = ("auto", GHOST, MATERIALISE)  # "auto": choose_method per layer; the others force it (tests)
# Elements of unfolded patches / Gram matrices / per-example gradients held at once (64 MiB of fp32):
# larger batches are processed in chunks of examples, so the transient memory stays bounded.
PATCH_BUDGET = 1 << 24


def choose_method(t: int, d: int, p: int) -> str:
    """The cheaper exact norm method for T rows of d inputs and p outputs, by multiply-adds per example.

    >>> choose_method(64, 256 * 9, 256), choose_method(1024, 64 * 9, 64)  # WRN-16-4 at 8x8 and 32x32
    ('ghost', 'materialise')
    """
    return GHOST if t * (d + p) < d * p else MATERIALISE


def conv_patches(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches [B, T, C_in kh kw] of a Conv2d (groups 1), in the weight's (c, i, j) order.

    A strided view of the padded input, made contiguous once (``F.unfold`` on CUDA launches one
    im2col kernel per example; benchmarks/NOTES.md).
    """
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = module.padding, module.stride, module.dilation, module.kernel_size
    b, c = a.shape[:2]
    x = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    x = x.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)  # [B, C, Ho, Wo, ekh, ekw]
    if dh > 1 or dw > 1:
        x = x[..., ::dh, ::dw]  # [B, C, Ho, Wo, kh, kw]
    ho, wo = x.shape[2:4]
    return x.permute(0, 2, 3, 1, 4, 5).reshape(b, ho * wo, c * kh * kw)


def _rows(module: nn.Module, a: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [B, T, d], G [B, T, p]) for a Linear (any leading dims) or a Conv2d (patches and positions)."""
    b = len(a)
    if isinstance(module, nn.Linear):
        return a.reshape(b, -1, a.shape[-1]), dz.reshape(b, -1, dz.shape[-1])
    return conv_patches(module, a), dz.flatten(2).transpose(1, 2)


def _sum_sq(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] -> [n] float32 sums of squares (reduced in float32 whatever x's dtype)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1, dtype=torch.float32).square()


def weight_norm_sq(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, method: str,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B] squared norms of the per-example weight gradients of a Linear or Conv2d, by ``method``."""
    if isinstance(module, nn.Linear) and a.dim() == 2:  # T = 1: ||g_i|| = ||dz_i|| ||a_i||, nothing to choose
        return _sum_sq(dz) * _sum_sq(a)
    a, dz = a.to(compute_dtype), dz.to(compute_dtype)
    b = len(a)
    out = torch.empty(b, device=a.device, dtype=torch.float32)
    t, d, p = _shape_tdp(module, a, dz)
    per_example = t * d + (2 * t * t if method == GHOST else d * p)  # elements held for one example
    step = max(1, PATCH_BUDGET // per_example)
    for s in range(0, b, step):
        rows, grads = _rows(module, a[s:s + step], dz[s:s + step])  # [n, T, d], [n, T, p]
        if method == GHOST:
            gram_a = torch.bmm(rows, rows.transpose(1, 2)).float()  # [n, T, T]
            gram_g = torch.bmm(grads, grads.transpose(1, 2)).float()  # [n, T, T]
            out[s:s + step] = (gram_a * gram_g).sum((1, 2)).clamp_(min=0)  # rounding can dip below 0
        else:
            out[s:s + step] = _sum_sq(torch.bmm(grads.transpose(1, 2), rows))  # [n, p, d]
    return out


def _shape_tdp(module: nn.Module, a: torch.Tensor, dz: torch.Tensor) -> tuple[int, int, int]:
    """(T, d, p) of a Linear or Conv2d on inputs ``a`` with output gradients ``dz``."""
    if isinstance(module, nn.Linear):
        return a[0].numel() // a.shape[-1], a.shape[-1], dz.shape[-1]
    kh, kw = module.kernel_size
    return dz[0, 0].numel(), a.shape[1] * kh * kw, dz.shape[1]


def layer_method(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, forced: str = "auto") -> str | None:
    """Norm method for a Linear/Conv2d layer (None for a 2-D Linear, where both coincide)."""
    if isinstance(module, nn.Linear) and a.dim() == 2:
        return None
    return choose_method(*_shape_tdp(module, a, dz)) if forced == "auto" else forced


def layer_norm_sq(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, method: str | None,
                  compute_dtype: torch.dtype) -> torch.Tensor:
    """[B] squared per-example gradient norms over a Linear's or Conv2d's weight and bias."""
    sq = weight_norm_sq(module, a, dz, method or MATERIALISE, compute_dtype)
    if module.bias is not None:  # per-example bias gradient: dz summed over positions, [B, p]
        sq = sq + _sum_sq(dz.float().reshape(len(dz), -1, dz.shape[-1]).sum(1) if isinstance(module, nn.Linear)
                          else dz.float().flatten(2).sum(2))
    return sq


def group_norm_norm_sq(module: nn.GroupNorm, a: torch.Tensor, dz: torch.Tensor):
    """([B] squared norms, (gamma, beta) per-example gradients [B, C] each) of an affine GroupNorm."""
    a_hat = F.group_norm(a.float(), module.num_groups, eps=module.eps)  # normalised input [B, C, ...]
    dzf = dz.float()
    spatial = tuple(range(2, a.dim()))
    gw, gb = (dzf * a_hat).sum(spatial), dzf.sum(spatial)
    return _sum_sq(gw) + _sum_sq(gb), (gw, gb)


def clipped_sum(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, factors: torch.Tensor, state: object,
                compute_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{"weight"/"bias": sum_i f_i g_i in float32, shaped like the parameter} by book-keeping (module docstring)."""
    b = len(factors)
    if isinstance(module, nn.GroupNorm):
        gw, gb = state
        return {"weight": factors @ gw, "bias": factors @ gb}
    if isinstance(module, nn.Linear):  # small in our models: float32 throughout
        a2 = a.float().reshape(-1, a.shape[-1])  # [B T, in]
        g2 = (dz.float().reshape(b, -1, dz.shape[-1]) * factors.view(b, 1, 1)).reshape(-1, dz.shape[-1])
        out = {"weight": g2.t() @ a2}  # [out, in]
        if module.bias is not None:
            out["bias"] = g2.sum(0)
        return out
    scaled = dz.to(compute_dtype) * factors.to(compute_dtype).view(b, 1, 1, 1)  # [B, C_out, Ho, Wo]
    weight = module.weight.detach().to(compute_dtype)  # shape/dtype only: the weight gradient does not read it
    _, gw, gb = torch.ops.aten.convolution_backward(
        scaled, a.to(compute_dtype), weight, [weight.shape[0]] if module.bias is not None else None,
        list(module.stride), list(module.padding), list(module.dilation), False, [0, 0], 1,
        [False, True, module.bias is not None])
    out = {"weight": gw.float()}
    if module.bias is not None:
        out["bias"] = gb.float()
    return out

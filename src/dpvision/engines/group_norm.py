"""Per-example gradients of an affine GroupNorm: [B, C] sums over space, one pass on CUDA.

For input ``a`` [B, C, H, W] in G groups and output gradient ``dz``, example i's gradients are

    gamma_i[c] = sum_s dz[i, c, s] * a_hat[i, c, s] = rstd[i, g] (sum_s dz a - mu[i, g] sum_s dz)
    beta_i[c]  = sum_s dz[i, c, s]

with mu, rstd the statistics of example i's group g. So four sums per (example, channel) row are
enough: sum dz a, sum dz, and the row's mean and squared deviations (combined over a group's rows
with Chan's formula: no E[a^2] - mu^2 cancellation). PyTorch computes them in about six passes over
the activations (var_mean, a product, three reductions); on CUDA one Triton kernel reads ``a`` and
``dz`` once (:func:`row_sums`), when Triton is installed. Both paths accumulate in float32 (float64
stays float64 on the PyTorch path) and differ only by rounding; the tests hold them to each other.

Example:
    >>> gn = nn.GroupNorm(2, 4)
    >>> a, dz = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    >>> sq, (gw, gb) = group_norm_norm_sq(gn, a, dz)
    >>> sq.shape, gw.shape, bool(torch.allclose(gb, dz.sum((2, 3))))
    (torch.Size([3]), torch.Size([3, 4]), True)
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from dpvision.engines.ghost import sum_sq

TRITON_BLOCK = 1024  # elements of a row per loop iteration of the kernel
# Rows of at most this many elements go to the kernel that sums several rows a program, TRITON_BLOCK elements a
# tile (0: one program a row whatever S). Why: ResNet-18 at 32x32, B 256 (H100, session 13, torch.profiler): the
# one-row kernel took 20% of a DP step's GPU time, 68 us a call, on rows of 64 to 1 elements.
SHORT_ROW_MAX = 512


@functools.cache
def _triton_kernels():
    """(one-row kernel, short-row kernel) (:mod:`dpvision.engines.triton_kernels`, compiled on first use), or
    None without Triton."""
    try:
        from dpvision.engines.triton_kernels import row_sums_kernel, short_row_sums_kernel
    except ImportError:
        return None
    return row_sums_kernel, short_row_sums_kernel


def triton_available(a: torch.Tensor, dz: torch.Tensor) -> bool:
    """Whether :func:`row_sums` can run its one-pass kernel on these tensors."""
    return (a.is_cuda and dz.is_cuda and a.is_contiguous() and dz.is_contiguous() and a.shape == dz.shape
            and a.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and dz.dtype in (torch.float32, torch.bfloat16, torch.float16) and _triton_kernels() is not None)


def row_sums(a: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """[B C, 4] float32 per (example, channel) row: sum dz a, sum dz, mean of a, sum of (a - mean)^2."""
    rows, s = a.shape[0] * a.shape[1], a[0, 0].numel()
    out = torch.empty(rows, 4, device=a.device, dtype=torch.float32)
    one_row, short_rows = _triton_kernels()
    if s <= SHORT_ROW_MAX:
        block = max(16, 1 << (s - 1).bit_length())  # the row padded to a power of two (a tile's width)
        per_program = TRITON_BLOCK // block  # rows a program: TRITON_BLOCK elements a tile
        short_rows[(-(-rows // per_program),)](a, dz, out, rows, s, ROWS=per_program, BLOCK=block)
    else:
        one_row[(rows,)](a, dz, out, s, BLOCK=TRITON_BLOCK)
    return out


def _statistics(module: nn.GroupNorm, a: torch.Tensor, dz: torch.Tensor):
    """(sum dz a [B, C], sum dz [B, C], group mean [B, G], group rstd [B, G]), float32 (or float64)."""
    b, c = a.shape[:2]
    groups = module.num_groups
    if triton_available(a, dz):
        sums = row_sums(a, dz).view(b, groups, c // groups, 4)  # [B, G, C/G, 4]
        s_az, s_z = sums[..., 0].reshape(b, c), sums[..., 1].reshape(b, c)
        row_mean, row_m2 = sums[..., 2], sums[..., 3]  # [B, G, C/G], rows of equal length S
        mean = row_mean.mean(2)  # [B, G]
        m2 = row_m2.sum(2) + (row_mean - mean.unsqueeze(2)).square().sum(2) * a[0, 0].numel()
        var = m2 / (a[0].numel() // groups)
        return s_az, s_z, mean, (var + module.eps).rsqrt()
    dtype = torch.float64 if dz.dtype == torch.float64 else torch.float32
    a3, dz3 = a.reshape(b, c, -1), dz.to(dtype).reshape(b, c, -1)  # [B, C, S]
    if a.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(a3.reshape(b, groups, -1), dim=2, correction=0)  # [B, G]
    else:  # a bf16 ``a`` is read as it is (no float32 copy): var = E[a^2] - mu^2 in float32
        ag = a3.reshape(b, groups, -1)  # [B, G, C/G S]
        mean = ag.sum(2, dtype=torch.float32) / ag.shape[2]
        var = (torch.linalg.vector_norm(ag, dim=2, dtype=torch.float32).square() / ag.shape[2]
               - mean.square()).clamp_(min=0)
    s_z = dz3.sum(2)  # [B, C]
    s_az = (dz3 * a3).sum(2, dtype=dtype)  # [B, C]
    return s_az, s_z, mean, (var.to(dtype) + module.eps).rsqrt()


def group_norm_norm_sq(module: nn.GroupNorm, a: torch.Tensor, dz: torch.Tensor):
    """([B] squared norms, (gamma, beta) per-example gradients [B, C] each, float32) of an affine GroupNorm."""
    b, c = a.shape[:2]
    groups = module.num_groups
    s_az, s_z, mean, rstd = _statistics(module, a, dz)
    gw = ((s_az.view(b, groups, -1) - mean.unsqueeze(2) * s_z.view(b, groups, -1))
          * rstd.unsqueeze(2)).view(b, c).float()  # per group of channels, [B, C]
    gb = s_z.float()
    return sum_sq(gw) + sum_sq(gb), (gw, gb)

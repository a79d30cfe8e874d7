"""Why every example's contribution stays within C in every precision: fp32 DP arithmetic and a margin.

The forward and backward may run in TF32 or bf16 (``precision``); what DP needs is that the norm used to
clip example i and the example's share of the clipped sum are the same function of the same numbers.
The manual backend therefore does its DP-critical arithmetic (pass 1, the per-example norms, and pass 2,
the clipped sum) in IEEE fp32 with TF32 off (:func:`fp32_matmuls`), on the stored operands of each layer
(its input A and output gradient G, upcast exactly from bf16 to fp32). Both passes then compute the
exact gradient g_i = G_i^T A_i of those numbers, each with fp32 rounding only.

Kept layers (per-example gradients that pass 1 materialises and keeps for pass 2): the tensor g^_i that
pass 1 stores is itself example i's share's data, pass 2 computing fl(f_i g^_i) from it, so however g^_i
was rounded (it reads example i's operands only: a batched product or cuDNN's grouped kernel, the examples
as groups) the norm of exactly those numbers bounds the share. Under bf16 (in chunks of at most 512 examples,
where measured faster) these layers form g^_i from the bf16 operands on tensor cores (float32 or bf16 out, upcast
exactly) and take its squared norm in float64; their chain is the p d one-sign squares (float64) and the product by f_i, and caveats (1) and (3) below do
not apply to them (only (2), the batch sum's own rounding).

The margin: with u = 2^-24 (fp32's unit roundoff) and gamma_n = n u / (1 - n u), the standard bound
for a sum of n products evaluated in ANY order (Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., Lemma 3.1 and eq. 3.5) is |fl(sum x_k) - sum x_k| <= gamma_n sum |x_k|. When the
terms of a reduction have one sign (a sum of squares always does) that is a relative bound gamma_n.
The longest chain of reductions behind example i's norm, per layer (``reduction_length``):

* 2-D Linear: ||a_i||^2 (d terms) times ||dz_i||^2 (p terms);
* ghost: Gram entries of A (d terms) and of G (p terms), their products summed over T^2 entries (in
  float64, so that long sum adds almost nothing);
* materialise / grouped: each entry of g_i is a dot product of T terms, then p d squares are summed (in
  float64: the squares are exact, the sum's rounding negligible);
* bias: T terms per entry, p squares; GroupNorm: its [B, C] gradients are the very tensors summed;
* kept: the p d squares of g^_i (float64) or the bias's p squares, then one rounding of f_i g^_ij.

Example i's share of pass 2 is f_i times entries that are dot products of T terms (the layer's batch
weight gradient sums B T terms; the other examples' terms are the sum's own rounding, below). So the
computed norm n^_i and the norm of the computed share c^_i obey, without cancellation,
n^_i >= ||g_i|| (1 - gamma_L) and ||c^_i|| <= f_i ||g_i|| (1 + gamma_T), L and T the chain lengths:
clipping n^_i (1 + eta) with eta = 2 gamma_{L + T + layers + 8} (rounded up: the layers' squared norms are
added and the square root taken in fp32 too) gives ||c^_i|| <= C.

What no margin covers, stated in ``docs/privacy.md``: (1) under cancellation (terms of both signs, the
usual case for the entries of a gradient) a relative bound cannot be proven at all: the error is bounded
by gamma_n sum |x_k|, which can exceed |sum x_k| by any factor; the margin is then a bound in the
typical case (random rounding errors grow like sqrt(n) u, far below gamma_n); (2) the rounding of the
sum over the batch itself (removing an example changes the rounding of every other example's terms),
which fp32 DP-SGD shares with every implementation, Opacus included; (3) cuDNN algorithms that are not
sums of products (FFT, Winograd) have normwise error bounds of the same order, not these.

Example:
    >>> round(margin([1000]), 7)  # one layer whose chain is 1000 roundings: 2 gamma_1009
    0.0001203
"""

from __future__ import annotations

import contextlib

import torch

UNIT_ROUNDOFF = 2.0 ** -24  # fp32: |fl(x) - x| <= u |x|


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): the relative bound of n successive fp32 roundings."""
    nu = n * UNIT_ROUNDOFF
    if nu >= 0.5:  # far beyond any layer here; a bound this weak would say nothing
        raise ValueError(f"a reduction of {n} terms is too long for an fp32 rounding bound")
    return nu / (1 - nu)


def margin(chains: list[int]) -> float:
    """eta for a chunk whose layers' reduction chains (:func:`reduction_length`) are ``chains``."""
    return 2 * gamma(max(chains, default=0) + len(chains) + 8)


def reduction_length(method: str | None, t: int, d: int, p: int, bias: bool, kept: bool = False) -> int:
    """Longest chain of fp32 roundings behind a Linear/Conv2d layer's squared norm and its pass-2 share:
    ``method`` None for a 2-D Linear, else ghost/materialise/grouped; (T, d, p) as in ``ghost.layer_shape``.
    The long sums of squares run in float64 (``exact``): a product of two fp32 numbers is exact there and n
    float64 roundings weigh n / 2^29 fp32 ones, counted rounded up, plus one for the cast back to fp32.
    ``kept``: pass 2 sums the very per-example gradients whose norms were taken (module docstring)."""
    if kept:  # the float64 sum of g^_i's p d squares (or the bias's p in float32), then f_i g^_ij
        return max(squares_length(p * d, exact=True), p if bias else 0) + 1
    if method is None:  # ||a_i||^2 ||dz_i||^2, float32 sums
        norm = d + p
    elif method == "ghost":  # Gram entries (d and p terms), their T^2 products summed in float64
        norm = d + p + _as_fp32(t * t) + 1
    else:  # an entry is a dot product of T terms, its p d squares summed in float64
        norm = t + _as_fp32(p * d) + 1
    if bias:  # float32: each entry sums T terms, then p squares
        norm = max(norm, t + p)
    return norm + t  # + example i's pass-2 entries (T terms each)


def squares_length(n: int, exact: bool) -> int:
    """fp32 roundings of a sum of n squares: n in float32; in float64 (``exact``) as fp32 ones plus the cast."""
    return _as_fp32(n) + 1 if exact else n


def _as_fp32(n: int) -> int:
    """n float64 roundings as a number of fp32 ones (2^-53 = 2^-29 u), rounded up."""
    return -(-n // (1 << 29))


@contextlib.contextmanager
def fp32_matmuls():
    """IEEE fp32 matmuls and convolutions (TF32 off) for the block, the previous settings restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

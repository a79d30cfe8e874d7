"""Per-layer rules of the manual backend: exact per-example gradient norms, then the clipped sum.

For a layer with input ``a`` and output gradient ``dz`` (each example's loss gradient with respect
to the layer's output, all from one batched backward), example i's weight gradient is

    g_i = G_i^T A_i    [p, d]

with A_i [T, d] the example's input rows (a Linear: its T input vectors; a Conv2d: its T = Ho Wo unfolded
patches, d = C_in kh kw) and G_i [T, p] its output gradients. Its squared norm, three exact ways:

* ``"materialise"``: form g_i (unfolded patches, one batched product: T d p multiply-adds), sum squares;
* ``"grouped"`` (Conv2d): the same g_i by cuDNN's weight-gradient kernel, the examples as groups;
* ``"ghost"`` (Bu et al., NeurIPS 2022, "Scalable and Efficient Training of Large Convolutional
  Neural Networks with Differential Privacy"): ||G_i^T A_i||_F^2 = sum_{t,s} (A_i A_i^T)_{ts}
  (G_i G_i^T)_{ts}, two T x T Gram matrices, T^2 (d + p) multiply-adds an example; for a conv the
  patch Gram comes, when cheaper, from the padded input's Gram over channels (:func:`patch_gram`).

:func:`choose_method` takes ghost or materialise by multiply-adds (ghost for late, small-resolution,
wide layers such as WRN-16-4's 8x8 stage, materialise for early ones); on CUDA the backend times the
candidates once per layer and shape instead. No per-example gradient outlives its layer unless it is
kept for pass 2 (``manual.keep_budget``), and each is formed in chunks of examples bounded by ``PATCH_BUDGET``.

The clipped sum needs no per-example gradient (the book-keeping of Bu et al., ICML 2023,
"Differentially Private Optimization on Large Model at Small Cost"): with clip factors f [B],

    sum_i f_i g_i = sum_i f_i G_i^T A_i = (f * G)^T A

which is the layer's ordinary batch weight gradient with each example's output gradient scaled by
f_i: one ``aten.convolution_backward`` (cuDNN's weight-gradient kernel) for a Conv2d, one matrix
product for a Linear; or, for a layer whose per-example gradients pass 1 kept, one matrix-vector
product with them. GroupNorm's and LayerNorm's per-example gradients are [B, C] (sums over space or tokens of
``dz * a_hat`` and of ``dz``, :mod:`dpvision.engines.group_norm`, :mod:`dpvision.engines.layer_norm`): formed
once, used for both passes.

Weight-standardised convs (``WSConv2d``, W = standardize(V)): the formulas give example i's gradient with
respect to W; :func:`raw_weight_grads` maps it to V's, J^T g_i (J: the standardisation's Jacobian at V; pass 2
maps the clipped sum once). Their norms need that gradient, so such layers never take ghost norms.

Augmentation multiplicity (:mod:`dpvision.engines.augmult`): a conv's ``a`` [B, K, C, H, W] and ``dz``
[B, K, p, Ho, Wo] (a Linear's [B, K, ..., d]) hold K views of each example as more rows of it (T = K Ho Wo):
every method gives the per-example gradient summed over its views; no per-view gradient is ever formed.

Every function takes ``compute_dtype`` (float32, or bfloat16 for mixed precision): the products run in it;
norms are reduced in float32 (float64 with ``exact``), sums accumulated in float32. Gradients kept for pass 2
may be formed from bf16 operands (:mod:`.rounding`: the kept numbers are both the norm's and the sum's data).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpvision.models.layers import WSConv2d, standardize_weight

GHOST, MATERIALISE, GROUPED = "ghost", "materialise", "grouped"
# "auto": the cheapest by the layer's shapes (multiply-adds, see ``method_costs``), or on CUDA the fastest
# as timed once per layer and shape (the backend's autotune); the others force one (tests, benchmarks).
METHODS = ("auto", GHOST, MATERIALISE, GROUPED)
# Elements of unfolded patches / Gram matrices / per-example gradients held at once (128 MiB of fp32): larger
# batches are processed in chunks of examples, so the transient memory stays bounded.
PATCH_BUDGET = 1 << 25
# Elements of per-example weight gradients pass 1 may keep for pass 2 on the CPU (CUDA: manual.keep_budget).
KEEP_BUDGET = 1 << 25
GROUPED_PAD = 64  # examples: the grouped kernel's shapes under bf16 are multiples of this (one search each)


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


def _views(a: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A conv's input or output gradient as images [B K, C, H, W] and K (1 for [B, C, H, W], K views otherwise)."""
    return (a, 1) if a.dim() == 4 else (a.flatten(0, 1), a.shape[1])


def _padded_positions(module: nn.Conv2d, a: torch.Tensor) -> int:
    """Padded input positions of one example: its K views' (H + 2 ph)(W + 2 pw)."""
    (ph, pw) = module.padding
    return (a.shape[-2] + 2 * ph) * (a.shape[-1] + 2 * pw) * _views(a)[1]


def layer_shape(module: nn.Module, a: torch.Tensor, dz: torch.Tensor) -> tuple[int, int, int]:
    """(T, d, p) of a Linear or Conv2d on inputs ``a`` with output gradients ``dz``: g_i = G_i^T A_i is [p, d]."""
    if isinstance(module, nn.Linear):
        return a[0].numel() // a.shape[-1], a.shape[-1], dz.shape[-1]
    kh, kw = module.kernel_size
    return dz[0].numel() // dz.shape[-3], a.shape[-3] * kh * kw, dz.shape[-3]  # T over the K views


def method_costs(module: nn.Module, a: torch.Tensor, dz: torch.Tensor) -> dict[str, int]:
    """Multiply-adds per example of the squared norm by each method (the unfold's copy not counted).

    Ghost's input Gram is A A^T (T^2 d), or for a conv, when cheaper, the Gram of the padded input
    over channels ((H_p W_p)^2 C_in) summed over the kernel's offsets (:func:`patch_gram`).
    """
    t, d, p = layer_shape(module, a, dz)
    gram = t * t * d
    if isinstance(module, nn.Conv2d):
        gram = min(gram, _padded_positions(module, a) ** 2 * a.shape[-3])
    costs = {GHOST: gram + t * t * p, MATERIALISE: t * d * p}
    if isinstance(module, WSConv2d):  # the norm of J^T g_i needs g_i itself
        del costs[GHOST]
    if isinstance(module, nn.Conv2d):
        costs[GROUPED] = t * d * p
    return costs


def choose_method(module: nn.Module, a: torch.Tensor, dz: torch.Tensor) -> str:
    """Ghost or materialise, whichever needs fewer multiply-adds (ties: materialise).

    >>> a, dz = torch.zeros(1, 256, 8, 8), torch.zeros(1, 256, 8, 8)  # WRN-16-4 at 8x8: T=64, d=2304, p=256
    >>> choose_method(nn.Conv2d(256, 256, 3, padding=1), a, dz)
    'ghost'
    >>> choose_method(nn.Conv2d(64, 64, 3, padding=1), torch.zeros(1, 64, 32, 32), torch.zeros(1, 64, 32, 32))
    'materialise'
    >>> # A Linear on T tokens: ghost when T < d p / (d + p) (ViT-B/16: T = 197 < 614 for its 768 x 3072 MLP)
    >>> choose_method(nn.Linear(768, 3072), torch.zeros(1, 197, 768), torch.zeros(1, 197, 3072))
    'ghost'
    """
    costs = method_costs(module, a, dz)
    return GHOST if costs.get(GHOST, costs[MATERIALISE]) < costs[MATERIALISE] else MATERIALISE


def patch_gram(module: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """[n, T, T] Gram matrices A_i A_i^T of a conv's unfolded patches, in a's dtype.

    When (H_p W_p)^2 C < T^2 C kh kw, without unfolding: M_i = X_i^T X_i over channels of the padded
    input [H_p W_p, H_p W_p], and (A_i A_i^T)_{ts} = sum over kernel offsets (u, v) of
    M_i[pos(t) + (u, v), pos(s) + (u, v)], each a strided window of M_i (stride and dilation as the conv's).
    """
    (ph, pw), (sh, sw), (dh, dw), (kh, kw) = module.padding, module.stride, module.dilation, module.kernel_size
    images, k = _views(a)  # [n K, C, H, W]
    n, (c, h, w) = len(a), images.shape[1:]
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    if (hp * wp) ** 2 >= (ho * wo) ** 2 * kh * kw:
        rows = conv_patches(module, images).reshape(n, k * ho * wo, -1)  # [n, K T, d]
        return torch.bmm(rows, rows.transpose(1, 2))
    x = F.pad(images, (pw, pw, ph, ph)) if ph or pw else images
    if k > 1:  # every view's positions in a row: [n, C, K Hp Wp]
        x = x.reshape(n, k, c, hp * wp).transpose(1, 2)
    x = x.reshape(n, c, k * hp * wp)
    m = torch.bmm(x.transpose(1, 2), x).view(n, k, hp, wp, k, hp, wp)  # views x positions, twice
    out = torch.zeros(n, k, ho, wo, k, ho, wo, device=a.device, dtype=a.dtype)
    for u in range(kh):
        rows = slice(u * dh, u * dh + sh * (ho - 1) + 1, sh)
        for v in range(kw):
            cols = slice(v * dw, v * dw + sw * (wo - 1) + 1, sw)
            out += m[:, :, rows, cols, :, rows, cols]
    return out.view(n, k * ho * wo, k * ho * wo)


def _rows(module: nn.Module, a: torch.Tensor, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [B, T, d], G [B, T, p]) for a Linear (any leading dims) or a Conv2d (patches and positions; T over the
    example's K views, in the same (view, position) order for both)."""
    b = len(a)
    if isinstance(module, nn.Linear):
        return a.reshape(b, -1, a.shape[-1]), dz.reshape(b, -1, dz.shape[-1])
    if a.dim() == 4:
        return conv_patches(module, a), dz.flatten(2).transpose(1, 2)
    rows = conv_patches(module, a.flatten(0, 1))  # [B K, T, d]
    return rows.reshape(b, -1, rows.shape[-1]), dz.movedim(2, -1).reshape(b, -1, dz.shape[2])


def sum_sq(x: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """[n, ...] -> [n] sums of squares, reduced in float32 (float64 stays float64; ``exact``: in float64,
    where the squares of float32 numbers are exact and the sum's rounding negligible, :mod:`.rounding`)."""
    dtype = torch.float64 if exact or x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x.flatten(1), dim=1, dtype=dtype).square()


def _ghost_chunk(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, dtype: torch.dtype,
                 exact: bool = False) -> torch.Tensor:
    """sum_{t,s} (A A^T)_{ts} (G G^T)_{ts} per example; Grams accumulated in ``dtype`` (float32 or 64), with
    ``exact`` their products summed in float64 (:mod:`.rounding`: the T^2 sum leaves the margin's chain)."""
    if isinstance(module, nn.Conv2d):
        gram_a = patch_gram(module, a.to(dtype))  # [n, T, T]
        grads = dz.flatten(2) if dz.dim() == 4 else dz.movedim(2, 1).flatten(2)  # [n, p, (K) T]
        gram_g = torch.bmm(grads.transpose(1, 2), grads).to(dtype)  # [n, T, T]
    else:
        rows, grads = _rows(module, a, dz)  # [n, T, d], [n, T, p]
        gram_a = torch.bmm(rows, rows.transpose(1, 2)).to(dtype)
        gram_g = torch.bmm(grads, grads.transpose(1, 2)).to(dtype)
    if exact:
        gram_a, gram_g = gram_a.double(), gram_g.double()
    return (gram_a * gram_g).sum((1, 2)).clamp_(min=0)  # rounding can dip below 0


def _grouped_chunk(module: nn.Conv2d, a: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """Per-example conv weight gradients [n, p d] (a's dtype) by cuDNN's weight-gradient kernel, examples as groups.
    bf16: cuDNN's default algorithm for these shapes was 5-10x slower than its benchmark mode's (H100,
    benchmarks/NOTES.md), so bf16 searches, once per shape: n is padded with zero examples (zero gradients) to a
    multiple of ``GROUPED_PAD``, or every Poisson-sized chunk would search again. fp32 gained nothing (no search)."""
    search = a.dtype in (torch.bfloat16, torch.float16)
    if search and len(a) % GROUPED_PAD:
        pad = [(0, 0) * (t.dim() - 1) + (0, GROUPED_PAD - len(a) % GROUPED_PAD) for t in (a, dz)]  # 0 examples
        return _grouped_chunk(module, F.pad(a, pad[0]), F.pad(dz, pad[1]))[:len(a)]
    n, c, (h, w), p = len(a), a.shape[-3], a.shape[-2:], dz.shape[-3]
    a, dz = (a.unsqueeze(1), dz.unsqueeze(1)) if a.dim() == 4 else (a, dz)  # K views: the grouped call's batch
    a, dz = a.transpose(0, 1).reshape(-1, n * c, h, w), dz.transpose(0, 1).reshape(-1, n * p, *dz.shape[-2:])
    weight = a.new_empty((n * p, c, *module.kernel_size))  # shape and dtype only (cuDNN sums over the K views)
    with torch.backends.cudnn.flags(enabled=True, benchmark=search, deterministic=False,
                                    allow_tf32=torch.backends.cudnn.allow_tf32):
        _, grads, _ = torch.ops.aten.convolution_backward(dz, a, weight, None, module.stride, module.padding,
                                                          module.dilation, False, [0, 0], n, [False, True, False])
    return grads.view(n, -1)


def _gram_elements(module: nn.Module, a: torch.Tensor, t: int, d: int) -> int:
    """Elements an example of ghost's input Gram needs: patches [T, d], or a smaller padded-input Gram (patch_gram)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        if _padded_positions(module, a) ** 2 < t * t * kh * kw:
            return _padded_positions(module, a) ** 2
    return t * d


def per_example_product(g_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[n, p, d] = G_i^T A_i of [n, T, p], [n, T, d]; bf16 operands on CUDA (torch >= 2.8): float32 out (exact
    products, float32 accumulation), elsewhere the operands' dtype. Batch entry i reads example i only."""
    x = g_rows.transpose(1, 2)
    wide = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and hasattr(torch.ops.aten.bmm, "dtype")
    return torch.bmm(x, rows, out_dtype=torch.float32) if wide else torch.bmm(x, rows)


def _materialise(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, method: str) -> torch.Tensor:
    """Per-example gradients [n, p d] of the weight parameter (in its (out, in...) order) by ``method``."""
    if method == GROUPED:
        return raw_weight_grads(module, _grouped_chunk(module, a, dz))
    rows, g_rows = _rows(module, a, dz)  # [n, T, d], [n, T, p]
    return raw_weight_grads(module, per_example_product(g_rows, rows).view(len(a), -1))


def raw_weight_grads(module: nn.Module, grads: torch.Tensor) -> torch.Tensor:
    """Gradients [n, p d] with respect to the kernel a conv computes with -> with respect to its weight parameter:
    unchanged for a plain layer; J^T g for a ``WSConv2d`` (J: the Jacobian of ``standardize_weight`` at the
    weight, per output channel; a mean and a dot product over the fan-in, :func:`weight_chain`)."""
    if not isinstance(module, WSConv2d):
        return grads
    if grads.dtype in (torch.bfloat16, torch.float16):  # standardisation's Jacobian in float32 (exact upcast)
        grads = grads.float()
    weight = module.weight.detach().to(grads.dtype)
    _, vjp = torch.func.vjp(standardize_weight, weight)
    return torch.func.vmap(vjp)(grads.view(-1, *weight.shape))[0].reshape(grads.shape)


def weight_chain(module: nn.Module) -> int:
    """fp32 roundings :func:`raw_weight_grads` adds to each entry (:mod:`.rounding`): two sums over the fan-in."""
    return 2 * module.weight[0].numel() if isinstance(module, WSConv2d) else 0


def norms_and_grads(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, method: str,
                    compute_dtype: torch.dtype = torch.float32, keep: bool = False, exact: bool = False):
    """([B] squared norms of the per-example weight gradients of a Linear or Conv2d by ``method``, and with ``keep``
    those very gradients [B, p d] when the method materialises them, else None). ``exact``: the sums of squares
    (and ghost's sum of Gram products) in float64 (:mod:`.rounding`)."""
    if isinstance(module, nn.Linear) and a.dim() == 2:  # T = 1: ||g_i|| = ||dz_i|| ||a_i||, nothing to choose
        return sum_sq(dz) * sum_sq(a), None
    if method == GROUPED and not isinstance(module, nn.Conv2d) or method == GHOST and isinstance(module, WSConv2d):
        method = MATERIALISE
    a, dz = a.to(compute_dtype).contiguous(), dz.to(compute_dtype).contiguous()
    b = len(a)
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    out = torch.empty(b, device=a.device, dtype=torch.float64 if exact else acc_dtype)
    t, d, p = layer_shape(module, a, dz)
    if method == GHOST:  # held per example: the input Gram's operand and three T x T Grams/products
        per_example = _gram_elements(module, a, t, d) + 3 * t * t
    else:  # patches (not for grouped) and the per-example gradient
        per_example = (0 if method == GROUPED else t * d) + d * p
    step = max(1, PATCH_BUDGET // per_example)
    if step >= b:  # one chunk: no copies into ``out``
        if method == GHOST:
            return _ghost_chunk(module, a, dz, acc_dtype, exact), None
        grads = _materialise(module, a, dz, method)
        return sum_sq(grads, exact), grads if keep else None
    kept = None  # [B, p d], filled chunk by chunk (no list of chunks and their concatenation at the peak)
    for s in range(0, b, step):
        a_s, dz_s = a[s:s + step], dz[s:s + step]
        if method == GHOST:
            out[s:s + step] = _ghost_chunk(module, a_s, dz_s, acc_dtype, exact)
            continue
        grads = _materialise(module, a_s, dz_s, method)
        out[s:s + step] = sum_sq(grads, exact)
        if keep:
            kept = grads.new_empty((b, grads.shape[1])) if kept is None else kept
            kept[s:s + step] = grads
    return out, kept


def weight_norm_sq(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, method: str,
                   compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B] squared norms of the per-example weight gradients of a Linear or Conv2d, by ``method``."""
    return norms_and_grads(module, a, dz, method, compute_dtype)[0]


def layer_method(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, forced: str = "auto") -> str | None:
    """Norm method for a Linear/Conv2d layer by the shape rule (None for a 2-D Linear: nothing to choose)."""
    if isinstance(module, nn.Linear) and a.dim() == 2:
        return None
    if forced == GROUPED and not isinstance(module, nn.Conv2d) or forced == GHOST and isinstance(module, WSConv2d):
        return MATERIALISE
    return choose_method(module, a, dz) if forced == "auto" else forced


def fastest_method(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, compute_dtype: torch.dtype,
                   slack: float = 4.0, repeats: int = 3, kept_dtype: torch.dtype | None = None) -> str:
    """The method that runs fastest here (CUDA events, fastest of ``repeats`` runs after one warm-up),
    among those whose multiply-adds are within ``slack`` times the fewest. All are exact: this only
    picks a speed. ``kept_dtype``: the materialising methods run in it (their gradients kept for pass 2)."""
    costs = method_costs(module, a, dz)
    best, times = min(costs.values()), {}
    for method, cost in costs.items():
        if cost > slack * best:
            continue
        dtype = compute_dtype if method == GHOST or kept_dtype is None else kept_dtype
        weight_norm_sq(module, a, dz, method, dtype)  # warm-up: allocations, cuDNN's search
        runs = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            weight_norm_sq(module, a, dz, method, dtype)
            end.record()
            runs.append((start, end))
        runs[-1][1].synchronize()
        times[method] = min(s.elapsed_time(e) for s, e in runs)
    return min(times, key=times.get)


def layer_norm_sq(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, method: str | None,
                  compute_dtype: torch.dtype, keep: bool = False,
                  bias_grads: torch.Tensor | None = None, exact: bool = False) -> tuple[torch.Tensor, tuple]:
    """([B] squared per-example gradient norms over a Linear's or Conv2d's weight and bias, ``clipped_sum``'s
    state: (per-example bias gradients [B, p] in float32 or None, per-example weight gradients or None)).
    ``bias_grads``: the per-example bias gradients [B, p] when already known (a fused block's backward)."""
    sq, grads = norms_and_grads(module, a, dz, method or MATERIALISE, compute_dtype, keep, exact)
    if module.bias is None:
        return sq, (None, grads)
    if bias_grads is not None:
        gb = bias_grads
    elif isinstance(module, nn.Linear):
        gb = dz.reshape(len(dz), -1, dz.shape[-1]).sum(1, dtype=torch.float32)  # dz summed over positions
    else:
        gb = dz.sum((-2, -1), dtype=torch.float32)  # [B, p], or [B, K, p]: then summed over the views
        gb = gb if gb.dim() == 2 else gb.sum(1)
    return sq + sum_sq(gb), (gb, grads)


def add_clipped_sum(module: nn.Module, a: torch.Tensor, dz: torch.Tensor, factors: torch.Tensor, state: tuple,
                    compute_dtype: torch.dtype, views: dict[str, torch.Tensor]) -> None:
    """views["weight"/"bias"] (float32, flat) += sum_i f_i g_i, by book-keeping (module docstring).

    ``state``: what the layer's pass 1 kept: per-example GroupNorm/LayerNorm (gamma, beta or None) gradients,
    or (per-example bias gradients or None, per-example weight gradients or None).
    """
    b = len(factors)
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        gw, gb = state  # [B, C] each
        views["weight"].addmv_(gw.t(), factors)
        if gb is not None:
            views["bias"].addmv_(gb.t(), factors)
        return
    gb, grads = state
    if gb is not None:  # sum_i f_i (per-example bias gradient)
        views["bias"].addmv_(gb.t(), factors)
    if grads is not None:  # kept from pass 1 [B, p d]: one matrix-vector product
        wide = torch.promote_types(grads.dtype, factors.dtype)  # bf16 grads upcast (exact), f never rounded
        if wide == views["weight"].dtype:
            views["weight"].addmv_(grads.to(wide).t(), factors)
        else:
            views["weight"].add_(factors.to(wide) @ grads.to(wide))
        return
    if isinstance(module, nn.Linear):  # small in our models: float32 throughout
        a2 = a.float().reshape(-1, a.shape[-1])  # [B T, in]
        g2 = (dz.float().reshape(b, -1, dz.shape[-1]) * factors.view(b, 1, 1)).reshape(-1, dz.shape[-1])
        views["weight"].view(dz.shape[-1], a.shape[-1]).addmm_(g2.t(), a2)  # [out, in]
        return
    if a.dim() == 5:  # K views of each example: each view weighted by its example's factor
        factors, a, dz = factors.repeat_interleave(a.shape[1]), a.flatten(0, 1), dz.flatten(0, 1)
    # The weight gradient is linear in a and in dz per example: scale the smaller of the two by f.
    f = factors.to(compute_dtype).view(-1, 1, 1, 1)
    a, dz = a.to(compute_dtype), dz.to(compute_dtype)
    scale_a = a.numel() < dz.numel()
    weight = module.weight.detach().to(compute_dtype)  # shape/dtype only: the weight gradient does not read it
    _, gw, _ = torch.ops.aten.convolution_backward(
        dz if scale_a else dz * f, a * f if scale_a else a, weight, None, list(module.stride),
        list(module.padding), list(module.dilation), False, [0, 0], 1, [False, True, False])
    views["weight"].add_(raw_weight_grads(module, gw.reshape(1, -1)).view(-1))

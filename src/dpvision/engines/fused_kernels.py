"""Triton kernels of :mod:`dpvision.engines.fused` (imported only where Triton is installed).

One program per (example, group) of a [B, C, H, W] conv output whose groups are CG channels of H W
contiguous elements; tiles are [CG_P2, BLOCK_HW]: the group's channels by pooled positions.
"""

import triton
import triton.language as tl


@triton.jit
def window(x_ptr, offs, mask, W, scale, shift):
    # The four GroupNorm outputs y of each 2x2 window [CG, BLOCK_HW], and x at those places.
    x0 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + offs + 1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + W, mask=mask, other=0.0).to(tl.float32)
    x3 = tl.load(x_ptr + offs + W + 1, mask=mask, other=0.0).to(tl.float32)
    return x0, x1, x2, x3, x0 * scale + shift, x1 * scale + shift, x2 * scale + shift, x3 * scale + shift

@triton.jit
def forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, stats_ptr, C, HW, W, Wo, HWo, CG, eps,
                   CG_P2: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # example i, group g: row = i G + g
    G = C // CG
    i, g = row // G, row % G
    x_base = x_ptr + (i * C + g * CG) * HW  # the group: CG channels of HW contiguous elements
    S = CG * HW
    n = tl.zeros((), tl.float32)
    mean = tl.zeros((), tl.float32)
    m2 = tl.zeros((), tl.float32)
    for start in range(0, S, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        mask = offs < S
        x = tl.load(x_base + offs, mask=mask, other=0.0).to(tl.float32)
        cnt = tl.minimum(S - start, BLOCK_S).to(tl.float32)
        b_mean = tl.sum(x, axis=0) / cnt
        d = tl.where(mask, x - b_mean, 0.0)
        total = n + cnt
        delta = b_mean - mean
        mean += delta * (cnt / total)
        m2 += tl.sum(d * d, axis=0) + delta * delta * (n * cnt / total)
        n = total
    rstd = 1.0 / tl.sqrt(m2 / S + eps)
    tl.store(stats_ptr + row * 2, mean)
    tl.store(stats_ptr + row * 2 + 1, rstd)

    c = tl.arange(0, CG_P2)  # [CG_P2] channels of the group
    c_mask = c < CG
    gamma = tl.load(w_ptr + g * CG + c, mask=c_mask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + g * CG + c, mask=c_mask, other=0.0).to(tl.float32)
    scale = (gamma * rstd)[:, None]  # y = x scale + shift
    shift = (beta - mean * gamma * rstd)[:, None]
    out_base = out_ptr + (i * C + g * CG) * HWo
    for start in range(0, HWo, BLOCK_HW):
        p = start + tl.arange(0, BLOCK_HW)  # [BLOCK_HW] pooled positions
        p_mask = p < HWo
        top_left = (p // Wo) * 2 * W + (p % Wo) * 2
        offs = c[:, None] * HW + top_left[None, :]  # [CG_P2, BLOCK_HW]
        mask = c_mask[:, None] & p_mask[None, :]
        _, _, _, _, y0, y1, y2, y3 = window(x_base, offs, mask, W, scale, shift)
        top = tl.maximum(tl.maximum(y0, y1), tl.maximum(y2, y3))
        tl.store(out_base + c[:, None] * HWo + p[None, :], tl.maximum(top, 0.0), mask=mask)

@triton.jit
def backward_kernel(x_ptr, w_ptr, b_ptr, stats_ptr, dout_ptr, dx_ptr, gw_ptr, gb_ptr, cb_ptr, C, HW, W, Wo, HWo, CG,
                    CG_P2: tl.constexpr, BLOCK_HW: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    G = C // CG
    i, g = row // G, row % G
    x_base = x_ptr + (i * C + g * CG) * HW
    dx_base = dx_ptr + (i * C + g * CG) * HW
    dout_base = dout_ptr + (i * C + g * CG) * HWo
    mean = tl.load(stats_ptr + row * 2)
    rstd = tl.load(stats_ptr + row * 2 + 1)
    c = tl.arange(0, CG_P2)
    c_mask = c < CG
    gamma = tl.load(w_ptr + g * CG + c, mask=c_mask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + g * CG + c, mask=c_mask, other=0.0).to(tl.float32)
    scale = (gamma * rstd)[:, None]
    shift = (beta - mean * gamma * rstd)[:, None]

    # Pass A: per channel, sum dy x_hat and sum dy (dy: the pooled gradient at each window's first
    # maximum when that maximum is > 0, else 0), and sum (x - mu) for the sums of dx below.
    s_gw = tl.zeros((CG_P2,), tl.float32)
    s_gb = tl.zeros((CG_P2,), tl.float32)
    s_xc = tl.zeros((CG_P2,), tl.float32)
    for start in range(0, HWo, BLOCK_HW):
        p = start + tl.arange(0, BLOCK_HW)
        p_mask = p < HWo
        top_left = (p // Wo) * 2 * W + (p % Wo) * 2
        offs = c[:, None] * HW + top_left[None, :]
        mask = c_mask[:, None] & p_mask[None, :]
        x0, x1, x2, x3, y0, y1, y2, y3 = window(x_base, offs, mask, W, scale, shift)
        go = tl.load(dout_base + c[:, None] * HWo + p[None, :], mask=mask, other=0.0).to(tl.float32)
        s0 = (y0 >= y1) & (y0 >= y2) & (y0 >= y3)
        s1 = ~s0 & (y1 >= y2) & (y1 >= y3)
        s2 = ~s0 & ~s1 & (y2 >= y3)
        top = tl.where(s0, y0, tl.where(s1, y1, tl.where(s2, y2, y3)))
        x_top = tl.where(s0, x0, tl.where(s1, x1, tl.where(s2, x2, x3)))
        dy = tl.where(top > 0.0, go, 0.0)
        s_gw += tl.sum(dy * (x_top - mean) * rstd, axis=1)
        s_gb += tl.sum(dy, axis=1)
        s_xc += tl.sum(tl.where(mask, (x0 - mean) + (x1 - mean) + (x2 - mean) + (x3 - mean), 0.0), axis=1)
    tl.store(gw_ptr + i * C + g * CG + c, s_gw, mask=c_mask)
    tl.store(gb_ptr + i * C + g * CG + c, s_gb, mask=c_mask)
    S = CG * HW
    m1 = tl.sum(gamma * s_gb, axis=0) / S  # mean over the group of gamma dy
    m2 = tl.sum(gamma * s_gw, axis=0) / S  # mean over the group of gamma dy x_hat
    # sum over a channel's HW places of dx (pass B's formula summed): the per-example bias gradient of a
    # conv whose output x is, without another pass over dx.
    tl.store(cb_ptr + i * C + g * CG + c, rstd * (gamma * s_gb - HW * m1 - m2 * rstd * s_xc), mask=c_mask)

    # Pass B: dx at all four places of every window.
    gamma2 = gamma[:, None]
    for start in range(0, HWo, BLOCK_HW):
        p = start + tl.arange(0, BLOCK_HW)
        p_mask = p < HWo
        top_left = (p // Wo) * 2 * W + (p % Wo) * 2
        offs = c[:, None] * HW + top_left[None, :]
        mask = c_mask[:, None] & p_mask[None, :]
        x0, x1, x2, x3, y0, y1, y2, y3 = window(x_base, offs, mask, W, scale, shift)
        go = tl.load(dout_base + c[:, None] * HWo + p[None, :], mask=mask, other=0.0).to(tl.float32)
        s0 = (y0 >= y1) & (y0 >= y2) & (y0 >= y3)
        s1 = ~s0 & (y1 >= y2) & (y1 >= y3)
        s2 = ~s0 & ~s1 & (y2 >= y3)
        s3 = ~s0 & ~s1 & ~s2
        top = tl.where(s0, y0, tl.where(s1, y1, tl.where(s2, y2, y3)))
        gdy = tl.where(top > 0.0, go, 0.0) * gamma2  # gamma dy at the window's maximum
        tl.store(dx_base + offs, rstd * (tl.where(s0, gdy, 0.0) - m1 - (x0 - mean) * rstd * m2), mask=mask)
        tl.store(dx_base + offs + 1, rstd * (tl.where(s1, gdy, 0.0) - m1 - (x1 - mean) * rstd * m2), mask=mask)
        tl.store(dx_base + offs + W, rstd * (tl.where(s2, gdy, 0.0) - m1 - (x2 - mean) * rstd * m2), mask=mask)
        tl.store(dx_base + offs + W + 1, rstd * (tl.where(s3, gdy, 0.0) - m1 - (x3 - mean) * rstd * m2),
                 mask=mask)

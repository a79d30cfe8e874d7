"""The fast engine's Triton kernels (imported only where Triton is installed; the callers fall back to PyTorch).

* ``row_sums_kernel`` / ``short_row_sums_kernel`` (:mod:`dpvision.engines.group_norm`): per (example, channel)
  row, Σ dz·a, Σ dz, mean and squared deviations of a, for the per-example GroupNorm gradients (one program a
  row; several rows a program where rows are short).
* ``forward_kernel`` / ``backward_kernel`` (:mod:`dpvision.engines.fused`): GroupNorm -> ReLU ->
  MaxPool2d(2), one program per (example, group) of a [B, C, H, W] conv output whose group is CG channels
  of H W contiguous elements; its tiles are [CG_P2, BLOCK_HW], the group's channels by pooled positions.
* ``relu_norm_forward_kernel`` / ``relu_norm_backward_kernel`` (:mod:`dpvision.engines.fused`): ReLU ->
  GroupNorm (WRN's pre-activation blocks), one program per (example, group), the same tiles over positions.

Statistics are combined block by block with Chan's formula (no E[a^2] - mu^2 cancellation); every sum is
float32 whatever the inputs' dtype.
"""

import triton
import triton.language as tl


@triton.jit
def chan_update(n, mean, m2, x, mask, cnt):
    """(count, mean, sum of squared deviations) after adding the ``cnt`` elements of ``x`` where ``mask``."""
    b_mean = tl.sum(x, axis=0) / cnt
    d = tl.where(mask, x - b_mean, 0.0)
    total = n + cnt
    delta = b_mean - mean
    return total, mean + delta * (cnt / total), m2 + tl.sum(d * d, axis=0) + delta * delta * (n * cnt / total)


@triton.jit
def row_sums_kernel(a_ptr, dz_ptr, out_ptr, S, BLOCK: tl.constexpr):
    # One program per (example, channel) row of S elements: sum dz a, sum dz, mean of a, and the
    # sum of squared deviations of a, block by block.
    row = tl.program_id(0).to(tl.int64)
    base = row * S
    s_az = tl.zeros((), tl.float32)
    s_z = tl.zeros((), tl.float32)
    n = tl.zeros((), tl.float32)
    mean = tl.zeros((), tl.float32)
    m2 = tl.zeros((), tl.float32)
    for start in range(0, S, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < S
        x = tl.load(a_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(dz_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        s_az += tl.sum(x * g, axis=0)
        s_z += tl.sum(g, axis=0)
        n, mean, m2 = chan_update(n, mean, m2, x, mask, tl.minimum(S - start, BLOCK).to(tl.float32))
    tl.store(out_ptr + row * 4 + 0, s_az)
    tl.store(out_ptr + row * 4 + 1, s_z)
    tl.store(out_ptr + row * 4 + 2, mean)
    tl.store(out_ptr + row * 4 + 3, m2)


@triton.jit
def short_row_sums_kernel(a_ptr, dz_ptr, out_ptr, R, S, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # The same four sums for rows of S <= BLOCK elements, ROWS rows a program (a [ROWS, BLOCK] tile, one load):
    # the late layers of a ResNet at 32x32 have rows of 64 down to 1 element, where one program per row and
    # a 1,024-wide block left almost every lane idle. One block a row: mean first, then squared deviations.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    row_mask = rows < R
    mask = row_mask[:, None] & (cols < S)[None, :]
    offs = rows[:, None] * S + cols[None, :]
    x = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / S  # (S: an int, or a constexpr 1 where Triton specialises it)
    d = tl.where(mask, x - mean[:, None], 0.0)
    tl.store(out_ptr + rows * 4 + 0, tl.sum(x * g, axis=1), mask=row_mask)
    tl.store(out_ptr + rows * 4 + 1, tl.sum(g, axis=1), mask=row_mask)
    tl.store(out_ptr + rows * 4 + 2, mean, mask=row_mask)
    tl.store(out_ptr + rows * 4 + 3, tl.sum(d * d, axis=1), mask=row_mask)


@triton.jit
def window(x_ptr, c, c_mask, start, HW, W, Wo, HWo, scale, shift, BLOCK_HW: tl.constexpr):
    """One tile of 2x2 windows: (x offsets of their top-left elements [CG_P2, BLOCK_HW], pooled positions
    [BLOCK_HW], the tile's mask, x at the four places of each window, and the four GroupNorm outputs y)."""
    p = start + tl.arange(0, BLOCK_HW)
    offs = c[:, None] * HW + ((p // Wo) * 2 * W + (p % Wo) * 2)[None, :]
    mask = c_mask[:, None] & (p < HWo)[None, :]
    x0 = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + offs + 1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + offs + W, mask=mask, other=0.0).to(tl.float32)
    x3 = tl.load(x_ptr + offs + W + 1, mask=mask, other=0.0).to(tl.float32)
    return (offs, p, mask, x0, x1, x2, x3,
            x0 * scale + shift, x1 * scale + shift, x2 * scale + shift, x3 * scale + shift)


@triton.jit
def window_gradient(dout_ptr, c, p, mask, HWo, y0, y1, y2, y3):
    """Which of the four places is each window's first maximum (PyTorch's rule for equal values), and
    dy there: the pooled gradient if that maximum is > 0 (ReLU), else 0."""
    go = tl.load(dout_ptr + c[:, None] * HWo + p[None, :], mask=mask, other=0.0).to(tl.float32)
    s0 = (y0 >= y1) & (y0 >= y2) & (y0 >= y3)
    s1 = ~s0 & (y1 >= y2) & (y1 >= y3)
    s2 = ~s0 & ~s1 & (y2 >= y3)
    s3 = ~s0 & ~s1 & ~s2
    top = tl.where(s0, y0, tl.where(s1, y1, tl.where(s2, y2, y3)))
    return s0, s1, s2, s3, tl.where(top > 0.0, go, 0.0)


@triton.jit
def affine(w_ptr, b_ptr, g, CG, mean, rstd, CG_P2: tl.constexpr):
    """(channels [CG_P2], their mask, gamma, scale, shift) of group g: y = x scale + shift."""
    c = tl.arange(0, CG_P2)
    c_mask = c < CG
    gamma = tl.load(w_ptr + g * CG + c, mask=c_mask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + g * CG + c, mask=c_mask, other=0.0).to(tl.float32)
    return c, c_mask, gamma, (gamma * rstd)[:, None], (beta - mean * gamma * rstd)[:, None]


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
        n, mean, m2 = chan_update(n, mean, m2, x, mask, tl.minimum(S - start, BLOCK_S).to(tl.float32))
    rstd = 1.0 / tl.sqrt(m2 / S + eps)
    tl.store(stats_ptr + row * 2, mean)
    tl.store(stats_ptr + row * 2 + 1, rstd)

    c, c_mask, gamma, scale, shift = affine(w_ptr, b_ptr, g, CG, mean, rstd, CG_P2)
    out_base = out_ptr + (i * C + g * CG) * HWo
    for start in range(0, HWo, BLOCK_HW):
        _, p, mask, _, _, _, _, y0, y1, y2, y3 = window(x_base, c, c_mask, start, HW, W, Wo, HWo, scale, shift,
                                                        BLOCK_HW)
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
    c, c_mask, gamma, scale, shift = affine(w_ptr, b_ptr, g, CG, mean, rstd, CG_P2)

    # Pass A: per channel, sum dy x_hat and sum dy (example i's dgamma and dbeta), and sum (x - mu).
    s_gw = tl.zeros((CG_P2,), tl.float32)
    s_gb = tl.zeros((CG_P2,), tl.float32)
    s_xc = tl.zeros((CG_P2,), tl.float32)
    for start in range(0, HWo, BLOCK_HW):
        _, p, mask, x0, x1, x2, x3, y0, y1, y2, y3 = window(x_base, c, c_mask, start, HW, W, Wo, HWo, scale, shift,
                                                            BLOCK_HW)
        s0, s1, s2, _, dy = window_gradient(dout_base, c, p, mask, HWo, y0, y1, y2, y3)
        x_top = tl.where(s0, x0, tl.where(s1, x1, tl.where(s2, x2, x3)))
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

    # Pass B: dx = rstd (gamma dy - m1 - x_hat m2) at all four places of every window.
    gamma2 = gamma[:, None]
    for start in range(0, HWo, BLOCK_HW):
        offs, p, mask, x0, x1, x2, x3, y0, y1, y2, y3 = window(x_base, c, c_mask, start, HW, W, Wo, HWo, scale,
                                                               shift, BLOCK_HW)
        s0, s1, s2, s3, dy = window_gradient(dout_base, c, p, mask, HWo, y0, y1, y2, y3)
        gdy = dy * gamma2
        tl.store(dx_base + offs, rstd * (tl.where(s0, gdy, 0.0) - m1 - (x0 - mean) * rstd * m2), mask=mask)
        tl.store(dx_base + offs + 1, rstd * (tl.where(s1, gdy, 0.0) - m1 - (x1 - mean) * rstd * m2), mask=mask)
        tl.store(dx_base + offs + W, rstd * (tl.where(s2, gdy, 0.0) - m1 - (x2 - mean) * rstd * m2), mask=mask)
        tl.store(dx_base + offs + W + 1, rstd * (tl.where(s3, gdy, 0.0) - m1 - (x3 - mean) * rstd * m2), mask=mask)


@triton.jit
def lane_update(cnt, mean, m2, x, mask):
    """Welford's update of every lane of a tile [R, S] (its own count, mean and sum of squared deviations)
    with the lane's element where ``mask``. Elementwise: no reduction inside the caller's loop (a reduction
    carried around a loop over 2-D tiles trips Triton's TritonGPUOptimizeThreadLocality pass on H100)."""
    cnt = cnt + mask.to(tl.float32)
    delta = x - mean
    mean = mean + tl.where(mask, delta / tl.maximum(cnt, 1.0), 0.0)
    return cnt, mean, m2 + tl.where(mask, delta * (x - mean), 0.0)


@triton.jit
def lanes_combined(cnt, mean, m2):
    """(mean, sum of squared deviations) of all the lanes' elements together, by Chan's formula: the
    lanes' sums plus each lane's count times its mean's squared distance to the overall mean."""
    total = tl.sum(tl.sum(cnt, axis=1), axis=0)
    mu = tl.sum(tl.sum(cnt * mean, axis=1), axis=0) / total
    d = mean - mu
    return mu, tl.sum(tl.sum(m2 + cnt * d * d, axis=1), axis=0)


@triton.jit
def relu_tile(x_ptr, c, c_mask, start, HW, stride_c, stride_p, BLOCK_HW: tl.constexpr):
    """One tile [CG_P2, BLOCK_HW] of a group (channels by positions, either memory layout: the strides of a
    channel and of a position): (offsets, mask, x, relu(x)), float32."""
    p = start + tl.arange(0, BLOCK_HW)
    offs = c[:, None] * stride_c + p[None, :] * stride_p
    mask = c_mask[:, None] & (p < HW)[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, x, tl.maximum(x, 0.0)


@triton.jit
def relu_norm_forward_kernel(x_ptr, w_ptr, b_ptr, out_ptr, stats_ptr, C, HW, CG, eps, stride_n, stride_c, stride_p,
                             CG_P2: tl.constexpr, BLOCK_HW: tl.constexpr):
    # out has x's strides: NCHW (stride_c = HW, stride_p = 1) or channels-last (stride_c = 1, stride_p = C).
    row = tl.program_id(0).to(tl.int64)  # example i, group g: row = i G + g
    G = C // CG
    i, g = row // G, row % G
    base = i * stride_n + g * CG * stride_c  # the group's first element
    c = tl.arange(0, CG_P2)
    c_mask = c < CG
    cnt = tl.zeros((CG_P2, BLOCK_HW), tl.float32)  # statistics of relu(x), lane by lane
    lane_mean = tl.zeros((CG_P2, BLOCK_HW), tl.float32)
    lane_m2 = tl.zeros((CG_P2, BLOCK_HW), tl.float32)
    for start in range(0, HW, BLOCK_HW):
        _, mask, _, r = relu_tile(x_ptr + base, c, c_mask, start, HW, stride_c, stride_p, BLOCK_HW)
        cnt, lane_mean, lane_m2 = lane_update(cnt, lane_mean, lane_m2, r, mask)
    mean, m2 = lanes_combined(cnt, lane_mean, lane_m2)
    rstd = 1.0 / tl.sqrt(m2 / (CG * HW) + eps)
    tl.store(stats_ptr + row * 2, mean)
    tl.store(stats_ptr + row * 2 + 1, rstd)
    c, c_mask, gamma, scale, shift = affine(w_ptr, b_ptr, g, CG, mean, rstd, CG_P2)
    for start in range(0, HW, BLOCK_HW):
        offs, mask, _, r = relu_tile(x_ptr + base, c, c_mask, start, HW, stride_c, stride_p, BLOCK_HW)
        tl.store(out_ptr + base + offs, r * scale + shift, mask=mask)


@triton.jit
def relu_norm_backward_kernel(x_ptr, w_ptr, b_ptr, stats_ptr, dy_ptr, dx_ptr, gw_ptr, gb_ptr, cb_ptr, C, HW, CG,
                              stride_n, stride_c, stride_p, CG_P2: tl.constexpr, BLOCK_HW: tl.constexpr):
    # dy and dx have x's strides.
    row = tl.program_id(0).to(tl.int64)
    G = C // CG
    i, g = row // G, row % G
    base = i * stride_n + g * CG * stride_c
    mean = tl.load(stats_ptr + row * 2)
    rstd = tl.load(stats_ptr + row * 2 + 1)
    c, c_mask, gamma, scale, shift = affine(w_ptr, b_ptr, g, CG, mean, rstd, CG_P2)

    # Pass A: per channel, sum dy x_hat and sum dy: example i's dgamma and dbeta.
    # Tiles accumulate elementwise and are reduced after the loop (see lane_update).
    a_gw = tl.zeros((CG_P2, BLOCK_HW), tl.float32)
    a_gb = tl.zeros((CG_P2, BLOCK_HW), tl.float32)
    for start in range(0, HW, BLOCK_HW):
        offs, mask, _, r = relu_tile(x_ptr + base, c, c_mask, start, HW, stride_c, stride_p, BLOCK_HW)
        dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)  # 0 where masked
        a_gw += dy * (r - mean) * rstd
        a_gb += dy
    s_gw = tl.sum(a_gw, axis=1)  # [CG_P2]
    s_gb = tl.sum(a_gb, axis=1)
    tl.store(gw_ptr + i * C + g * CG + c, s_gw, mask=c_mask)
    tl.store(gb_ptr + i * C + g * CG + c, s_gb, mask=c_mask)
    S = CG * HW
    m1 = tl.sum(gamma * s_gb, axis=0) / S  # mean over the group of gamma dy
    m2 = tl.sum(gamma * s_gw, axis=0) / S  # mean over the group of gamma dy x_hat

    # Pass B: dx = [x > 0] rstd (gamma dy - m1 - x_hat m2), and its sums over space per channel (the
    # per-example bias gradients of the conv whose output x is).
    gamma2 = gamma[:, None]
    a_cb = tl.zeros((CG_P2, BLOCK_HW), tl.float32)
    for start in range(0, HW, BLOCK_HW):
        offs, mask, x, r = relu_tile(x_ptr + base, c, c_mask, start, HW, stride_c, stride_p, BLOCK_HW)
        dy = tl.load(dy_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        dx = tl.where(mask & (x > 0.0), rstd * (gamma2 * dy - m1 - (r - mean) * rstd * m2), 0.0)
        tl.store(dx_ptr + base + offs, dx, mask=mask)
        a_cb += dx
    tl.store(cb_ptr + i * C + g * CG + c, tl.sum(a_cb, axis=1), mask=c_mask)

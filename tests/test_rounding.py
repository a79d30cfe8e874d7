"""Issue 20 item 3: under reduced precision every example's contribution to the clipped sum stays <= C.

The contribution of example j is measured as the engine computes it: the clipped sum with j minus the
clipped sum with j's weight set to 0 (same chunk, same shapes). bf16 is emulated on the CPU by the manual
backend's own bf16 path (autocast forward/backward, conv inputs stored in bf16). Before the fix the norms
(pass 1) and the sum (pass 2) were different bf16 reductions and contributions exceeded C by ~1e-3.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import dpvision.engines.ghost as ghost
import dpvision.engines.manual as manual
from dpvision.engines.augmult import AugmultManual
from dpvision.engines.clipping import CLIPPING_RULES
from dpvision.engines.ghost import GHOST, GROUPED, MATERIALISE
from dpvision.engines.per_sample import ManualPerSample
from dpvision.engines.rounding import gamma, margin, reduction_length
from dpvision.models.layers import WSConv2d

C = 0.05  # every example's gradient is longer: all are clipped to (just under) C
FP32_ROUNDING = 1e-5  # relative slack for the sum's own fp32 rounding (measured ~1e-7 here)


def model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def clipped_sum(backend: ManualPerSample, x, y, w, rule: str) -> torch.Tensor:
    acc = torch.zeros(sum(p.numel() for p in backend.model.parameters()), device=x.device)
    views, offset = [], 0
    for p in backend.model.parameters():
        views.append(acc[offset:offset + p.numel()])
        offset += p.numel()
    clip = functools.partial(CLIPPING_RULES[rule].factors, max_grad_norm=C)
    backend.accumulate(x, y, w.to(x.device), clip, views, torch.zeros((), device=x.device),
                       torch.zeros((), device=x.device))
    return acc.double().cpu()


@pytest.mark.parametrize("rule", ["flat", "automatic"])
@pytest.mark.parametrize("keep", [True, False], ids=["kept", "bookkeeping"])
@pytest.mark.parametrize("method", [GHOST, MATERIALISE, GROUPED])
def test_each_contribution_at_most_c_in_bf16(method, keep, rule, monkeypatch):
    if not keep:
        monkeypatch.setattr(ghost, "KEEP_BUDGET", 0)
    backend = ManualPerSample(model(), method=method)
    backend.amp_dtype = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    n = 12
    x, y = torch.randn(n, 3, 8, 8, generator=g) * 3, torch.randint(0, 5, (n,), generator=g)
    ones = torch.ones(n)
    with_all = clipped_sum(backend, x, y, ones, rule)
    worst = 0.0
    for j in range(n):
        w = ones.clone()
        w[j] = 0
        worst = max(worst, float((with_all - clipped_sum(backend, x, y, w, rule)).norm()) / C)
    backend.close()
    assert worst <= 1 + FP32_ROUNDING, f"an example contributes {worst:.6f} C"
    assert worst > 1 - 0.05  # and the examples are clipped to about C, not far below


def test_margin_from_the_standard_bound():
    """eta = 2 gamma_n over the longest chain (+ one per layer + 8); gamma_n = n u / (1 - n u)."""
    assert gamma(1000) == pytest.approx(1000 * 2.0 ** -24 / (1 - 1000 * 2.0 ** -24))
    # WRN-16-4's 32x32 convs materialised (T = 1024, d = 576, p = 64): the p d squares are summed in float64
    chain = reduction_length(MATERIALISE, 1024, 576, 64, bias=False)
    assert chain == 1024 + 1 + 1 + 1024
    assert margin([chain, 10]) == pytest.approx(2 * gamma(chain + 2 + 8))
    # its 8x8 convs by ghost norms (T = 64, d = 2304, p = 256): the largest chain, eta ~ 3.2e-4
    assert reduction_length(GHOST, 64, 2304, 256, bias=True) == 2304 + 256 + 1 + 1 + 64
    assert margin([2626] * 18) == pytest.approx(3.2e-4, rel=0.02)
    # kept per-example gradients (issue 23): the float64 sum of their p d squares (or the bias's p), then f_i g_ij
    assert reduction_length(MATERIALISE, 16 * 1024, 576, 64, bias=False, kept=True) == 1 + 1 + 1
    assert reduction_length(GROUPED, 16 * 1024, 576, 64, bias=True, kept=True) == 64 + 1
    with pytest.raises(ValueError, match="too long"):
        gamma(1 << 23)


def all_kept_model() -> nn.Module:
    """Convs (a weight-standardised one) and a GroupNorm only: every layer's per-example gradients are kept for
    pass 2 (materialise/grouped), so every example's share of the sum is explicit in pass 1's state."""
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(),
                         WSConv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="no CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("k", [1, 3], ids=["plain", "augmult3"])
@pytest.mark.parametrize("method", [MATERIALISE, GROUPED])
def test_kept_gradients_formed_in_bf16_and_each_share_of_them_at_most_c(method, k, device, monkeypatch):
    """Issue 23: under bf16 the kept per-example gradients are formed from the bf16 operands (before: fp32 from
    upcast operands; on CUDA a bf16 batched product has float32 output) and are the very numbers pass 2 multiplies
    by f_i, so ||f_i g^_i|| over all layers (float64), computed as pass 2 computes it, is <= C. The sum stays that
    of the fp32 path within bf16's rounding."""
    seen = []  # (module, factors, state) of every pass-2 call: the real add_clipped_sum, recorded
    monkeypatch.setattr(manual, "add_clipped_sum", lambda m, a, dz, f, state, *rest:
                        (seen.append((m, f, state)), ghost.add_clipped_sum(m, a, dz, f, state, *rest)))
    g = torch.Generator().manual_seed(1)
    n = 6
    x, y = torch.randn(n, 3, 8, 8, generator=g) * 3, torch.randint(0, 5, (n,), generator=g)
    x, y = x.to(device), y.to(device)

    def backend(amp, kept_dtype=None):
        model = all_kept_model().to(device)
        b = (AugmultManual(model, k=k, flip=True, generator=torch.Generator(device).manual_seed(0))
             if k > 1 else ManualPerSample(model))
        b.method, b.amp_dtype = method, amp  # n = 6 examples a chunk: the bf16 rule (library: up to 256)
        if kept_dtype is not None:  # the previous rule: kept gradients formed in fp32 from upcast operands
            monkeypatch.setattr(b, "_kept_dtype", lambda examples: kept_dtype)
        return b

    fp32 = clipped_sum(backend(None), x, y, torch.ones(n), "flat")
    fp32_kept = clipped_sum(backend(torch.bfloat16, torch.float32), x, y, torch.ones(n), "flat")
    seen.clear()
    ours = backend(torch.bfloat16)
    bf16 = clipped_sum(ours, x, y, torch.ones(n), "flat")
    shares = torch.zeros(n, dtype=torch.float64, device=device)
    # formed from bf16 operands: bf16 numbers, or float32 from a CUDA batched product (and a WSConv2d's Jacobian)
    formed = torch.float32 if device == "cuda" and method == MATERIALISE else torch.bfloat16
    for m, f, state in seen:
        tensors = state  # per-example (gamma, beta) gradients of a GroupNorm, (bias, weight) of a conv
        assert all(t is not None for t in tensors)  # all kept: nothing summed by book-keeping
        if isinstance(m, nn.Conv2d):
            assert tensors[1].dtype == (torch.float32 if isinstance(m, WSConv2d) else formed)
        for t in tensors:  # example i's share as pass 2 computes it (fp32 products of upcast kept numbers)
            shares += (f[:, None] * t.float()).double().square().sum(1)
    assert len(seen) == 4
    assert float(shares.sqrt().max()) <= C
    assert float(shares.sqrt().min()) > C * (1 - 0.01)  # all clipped, to about C
    assert float((bf16 - fp32).norm() / fp32.norm()) < 8e-2  # the bf16 forward itself (measured 3-5e-2)
    assert float((bf16 - fp32_kept).norm() / fp32_kept.norm()) < 1e-2  # the same forward (measured 2-3e-3)


@pytest.mark.parametrize("views", [0, 2], ids=["plain", "augmult2"])
def test_grouped_bf16_pads_examples_to_a_searched_shape_and_keeps_each_example_its_own(views):
    """Issue 23: under bf16 the grouped kernel's example count is padded with zero examples to a multiple of
    GROUPED_PAD (one cuDNN search per padded shape, not one per Poisson-sized chunk); each of the n examples
    still gets its own gradient: the rows equal the float32 kernel's on the same (bf16) numbers up to bf16 rounding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    n = 5  # not a multiple of GROUPED_PAD
    lead = (n, views) if views else (n,)
    a, dz = torch.randn(*lead, 3, 6, 6).bfloat16(), torch.randn(*lead, 4, 6, 6).bfloat16()
    got = ghost._grouped_chunk(conv, a, dz)
    want = ghost._grouped_chunk(conv, a.float(), dz.float())
    assert got.shape == want.shape == (n, 4 * 3 * 9)
    err = (got.float() - want).norm(dim=1) / want.norm(dim=1)
    assert float(err.max()) < 1e-2


def test_kept_gradients_from_bf16_operands_only_in_chunks_of_at_most_512_examples():
    """Measured on an H100 (docs/performance.md, sessions 10 and 13): kept gradients from the bf16 operands are
    faster in chunks of 256 and 512 examples and 2-4x slower in chunks of 1,024, so the library forms them from
    bf16 in chunks of at most 512 examples, whatever K, in fp32 otherwise (and always without bf16)."""
    b = ManualPerSample(all_kept_model())
    assert b._kept_dtype(256) == torch.float32  # no amp
    b.amp_dtype = torch.bfloat16
    assert b._kept_dtype(256) == torch.bfloat16 and b._kept_dtype(1) == torch.bfloat16
    assert b._kept_dtype(512) == torch.bfloat16 and b._kept_dtype(328) == torch.bfloat16  # B 256's largest chunk
    assert b._kept_dtype(513) == torch.float32 and b._kept_dtype(1024) == torch.float32
    augmult = AugmultManual(all_kept_model(), k=16, flip=False, generator=torch.Generator().manual_seed(0))
    augmult.amp_dtype = torch.bfloat16
    assert augmult._kept_dtype(512) == torch.bfloat16 and augmult._kept_dtype(513) == torch.float32

"""GroupNorm's per-example (gamma, beta) gradients: against per-example autograd, and the CUDA one-pass
kernel against the PyTorch path in float64."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from dpvision.engines import group_norm
from dpvision.engines.group_norm import group_norm_norm_sq, row_sums, triton_available

HAS_CUDA = torch.cuda.is_available()


def per_example_autograd(gn: nn.GroupNorm, a: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    rows = []
    for i in range(len(a)):
        gw, gb = torch.autograd.grad(gn(a[i:i + 1]), (gn.weight, gn.bias), dz[i:i + 1])
        rows.append(torch.cat([gw, gb]))
    return torch.stack(rows)  # [B, 2 C]


@pytest.mark.parametrize(("shift", "scale"), [(0.0, 1.0), (50.0, 0.01)])  # also a mean far above the spread
def test_per_example_gradients_equal_autograd(shift, scale):
    torch.manual_seed(0)
    gn = nn.GroupNorm(4, 8).double()
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
    a = (torch.randn(5, 8, 6, 7, dtype=torch.float64) * scale + shift)
    dz = torch.randn_like(a)
    expected = per_example_autograd(gn, a, dz)
    sq, (gw, gb) = group_norm_norm_sq(gn, a, dz)
    assert gw.dtype == torch.float32 and gw.shape == (5, 8)
    got = torch.cat([gw, gb], 1).double()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert torch.allclose(sq.double(), expected.square().sum(1), rtol=1e-5)
    sq32, _ = group_norm_norm_sq(gn.float(), a.float(), dz.float())  # float32 inputs: same to rounding
    assert torch.allclose(sq32.double(), expected.square().sum(1), rtol=1e-3)


def test_no_kernel_on_the_cpu():
    a = torch.randn(2, 4, 3, 3)
    assert not triton_available(a, a)


@pytest.mark.parametrize(("rows", "size"), [((3, 4), 3), ((3, 4), 40), ((3, 4), 1), ((5, 30), 2), ((7, 9), 17),
                                             ((2, 70), 8), ((3, 4), 23)])
@pytest.mark.parametrize("short_row_max", [group_norm.SHORT_ROW_MAX, 0], ids=["library", "one-row-kernel"])
def test_kernel_under_triton_interpreter_equals_float64(rows, size, short_row_max, monkeypatch):
    """The CUDA kernels' code, run by Triton's CPU interpreter (tests/conftest.py sets it where there is no CUDA):
    rows of S = 1 .. 1,600 elements, short ones several a program (row counts not a multiple of a program's),
    long ones Chan's combination over blocks; each short shape also through the one-row kernel."""
    pytest.importorskip("triton", reason="Triton is not installed: the PyTorch path runs instead")
    if HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is for machines without CUDA (test_cuda_kernel_equals_the_pytorch_path runs there)")
    monkeypatch.setattr(group_norm, "SHORT_ROW_MAX", short_row_max)
    torch.manual_seed(2)
    b, c = rows
    a, dz = torch.randn(b, c, size, size) * 0.5 + 3, torch.randn(b, c, size, size)
    sums = row_sums(a, dz).double()  # [B C, 4]
    a64, dz64 = a.double().reshape(b * c, -1), dz.double().reshape(b * c, -1)
    ref = torch.stack([(a64 * dz64).sum(1), dz64.sum(1), a64.mean(1),
                       (a64 - a64.mean(1, keepdim=True)).square().sum(1)], 1)
    assert torch.allclose(sums, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("size", [7, 8, 32, 64])  # S = 49 .. 4096: rows shorter and longer than a block
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_equals_the_pytorch_path(size, a_dtype):
    pytest.importorskip("triton", reason="Triton is not installed: the PyTorch path runs instead")
    torch.manual_seed(1)
    gn = nn.GroupNorm(4, 16).cuda()
    a = (torch.randn(33, 16, size, size, device="cuda") * 0.5 + 3).to(a_dtype)
    dz = torch.randn(33, 16, size, size, device="cuda")
    assert triton_available(a, dz)
    sums = row_sums(a, dz).double()  # [B C, 4]
    a64, dz64 = a.double().reshape(33 * 16, -1), dz.double().reshape(33 * 16, -1)
    ref = torch.stack([(a64 * dz64).sum(1), dz64.sum(1), a64.mean(1),
                       (a64 - a64.mean(1, keepdim=True)).square().sum(1)], 1)
    assert torch.allclose(sums, ref, rtol=1e-4, atol=1e-3)
    sq, (gw, gb) = group_norm_norm_sq(gn, a, dz)
    expected = per_example_autograd(gn.double(), a.double(), dz.double())
    got = torch.cat([gw, gb], 1).double()
    assert (got - expected).norm() / expected.norm() < 1e-4  # gamma = rstd (sum dz a - mu sum dz): cancellation
    assert torch.allclose(sq.double(), expected.square().sum(1), rtol=1e-4)

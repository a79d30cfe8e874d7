"""torchvision's ViT on the manual per-sample backend (issue 22): LayerNorm, attention's Linears on [B, T, D], the
class token and the position embedding, against real Opacus and torch.func.

A tiny ViT (2 blocks, width 8, 16x16 images in 4 patches + the class token) made DP-compatible as
``torchvision:vit_b_16`` is (:func:`~dpvision.models.external.make_dp_compatible`: Opacus's DPMultiheadAttention).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torchvision.models import VisionTransformer

from dpvision.engines import OptimizerSpec
from dpvision.engines.base import UnsupportedModelError
from dpvision.engines.clipping import CLIPPING_RULES
from dpvision.engines.fast import FastEngine
from dpvision.engines.ghost import GHOST, MATERIALISE
from dpvision.engines.layer_norm import layer_norm_grads
from dpvision.engines.per_sample import ManualPerSample, VmapPerSample
from dpvision.models.external import make_dp_compatible
from tests.engine_helpers import DP, fast_engine
from tests.test_fast_engine import make_data
from tests.test_per_sample import C, batch, flat, manual_clipped_sum, rel
from tests.test_rounding import clipped_sum


def tiny_vit(kind: type = VisionTransformer) -> nn.Module:
    """Random weights everywhere: torchvision starts the head at zero, which would leave every other gradient 0."""
    torch.manual_seed(0)
    model = make_dp_compatible(kind(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8,
                                    mlp_dim=16, num_classes=3))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def trainable_slices(model: nn.Module, names: list[str], flat_sum: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of a flat [P] sum over the trainable parameters that belong to the named parameters."""
    out, offset = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = flat_sum[offset:offset + p.numel()]
            offset += p.numel()
    return {n: out[n] for n in names}


def opacus_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """sum_i clip(g_i) [P] over the trainable parameters by real Opacus: the gradient its DPOptimizer hands SGD
    (noise 0, expected batch 1; read from .grad, not as a parameter difference, which would lose digits)."""
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = copy.deepcopy(model)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=c,
                      expected_batch_size=1, loss_reduction="sum")
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    opt.step()
    gsm._close()
    return flat(p.grad for p in params)


def manual_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: float, method: str = "auto"):
    """(sum_i clip(g_i) [P] over the trainable parameters by the manual backend, the backend)."""
    backend = ManualPerSample(model, method=method)
    params = [p for p in model.parameters() if p.requires_grad]
    acc = torch.zeros(sum(p.numel() for p in params))
    views = list(acc.split([p.numel() for p in params]))
    clip = functools.partial(CLIPPING_RULES["flat"].factors, max_grad_norm=c)
    backend.accumulate(x, y, torch.ones(len(x)), clip, views, torch.zeros(()), torch.zeros(()))
    backend.close()
    return acc.double(), backend


@pytest.mark.parametrize(("shape", "normalized", "bias"), [((5, 6), (6,), True), ((2, 3, 4), (3, 4), False)])
def test_layer_norm_gradients_equal_torch_func(shape, normalized, bias):
    """Per-example (gamma, beta) gradients [B, D] of an affine LayerNorm: sums over the example's tokens."""
    g = torch.Generator().manual_seed(0)
    ln = nn.LayerNorm(normalized, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(normalized, generator=g))
    a = torch.randn(4, *shape, generator=g, dtype=torch.float64) * 3 + 1
    dz = torch.randn(4, *shape, generator=g, dtype=torch.float64)
    params = {n: p.detach() for n, p in ln.named_parameters()}

    def example(p, ai, dzi):  # <LN(a_i), dz_i>: its gradient is example i's parameter gradient
        return (functional_call(ln, p, (ai.unsqueeze(0),)) * dzi.unsqueeze(0)).sum()

    ref = vmap(grad(example), in_dims=(None, 0, 0))(params, a, dz)
    gw, gb = layer_norm_grads(ln, a, dz)
    assert torch.allclose(gw, ref["weight"].reshape(4, -1), rtol=1e-10, atol=1e-12)
    assert (gb is None) == (not bias)
    if bias:
        assert torch.allclose(gb, ref["bias"].reshape(4, -1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("frozen", [None, "encoder.pos_embedding", "class_token"])
@pytest.mark.parametrize("method", [GHOST, MATERIALISE])
def test_vit_clipped_sum_equals_opacus(method, frozen):
    """Every parameter (class token and position embedding included) gets Opacus's clipped sum; a frozen token
    parameter gets nothing and counts in no norm."""
    model = tiny_vit()
    if frozen:
        model.get_parameter(frozen).requires_grad_(False)
    x, y = batch((3, 16, 16), n=6)
    ours, backend = manual_sum(model, x, y, C, method)
    ref = opacus_sum(model, x, y, C)
    assert rel(ours, ref) < 1e-6
    assert set(backend.chosen.values()) == {method, None}  # None: the 2-D head
    tokens = [n for n in ("class_token", "encoder.pos_embedding") if n != frozen]
    ours_t, ref_t = trainable_slices(model, tokens, ours), trainable_slices(model, tokens, ref)
    for name in tokens:
        assert ref_t[name].norm() > 1e-3 and rel(ours_t[name], ref_t[name]) < 1e-6, name


def test_vit_unclipped_sum_is_the_batch_gradient():
    """C far above every norm: the clipped sum is the plain gradient of the summed loss, tokens included."""
    model = tiny_vit()
    x, y = batch((3, 16, 16), n=5)
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    assert rel(manual_clipped_sum(model, x, y, 1e6)[0], flat(p.grad for p in model.parameters())) < 1e-5


def test_each_vit_contribution_at_most_c_in_bf16():
    """bf16 autocast (Linear and conv inputs cast once, LayerNorm in float32): example j's share of the sum, the
    sum with j minus the sum without, stays within C (the margin of :mod:`dpvision.engines.rounding`)."""
    backend = ManualPerSample(tiny_vit())
    backend.amp_dtype = torch.bfloat16
    x, y = batch((3, 16, 16), n=6)
    ones = torch.ones(len(x))
    with_all = clipped_sum(backend, x * 3, y, ones, "flat")
    shares = [float((with_all - clipped_sum(backend, x * 3, y, ones.index_fill(0, torch.tensor(j), 0), "flat")).norm())
              for j in range(len(x))]
    backend.close()
    assert max(shares) <= C * (1 + 1e-5) and min(shares) > 0.9 * C


class OwnViT(VisionTransformer):
    """A subclass: its forward may use the class token otherwise, so no token rule applies."""


def test_vit_subclass_is_refused_and_the_engine_falls_back_to_vmap():
    with pytest.raises(UnsupportedModelError, match="unsupported layer OwnViT"):
        ManualPerSample(tiny_vit(OwnViT))
    model = tiny_vit()
    model.encoder.forward = functools.partial(type(model.encoder).forward, model.encoder)  # replaced on the instance
    with pytest.raises(UnsupportedModelError, match="unsupported layer VisionTransformer"):  # its encoder's
        ManualPerSample(model)
    data = make_data(8, (3, 16, 16), 3)
    fast = fast_engine(model=tiny_vit(OwnViT), train_data=data, batch_size=3, optimizer=OptimizerSpec(lr=0.5),
                       dp=DP(noise_multiplier=1.0, max_grad_norm=1.0), seed=3, device="cpu")
    assert isinstance(fast, FastEngine) and fast.grad_sample_mode == "vmap"


def test_fast_engine_puts_the_vit_on_the_manual_backend_when_asked_and_on_vmap_by_default():
    """The token rules are opt-in: on an H100 ViT-B/16 ran faster on vmap (56 against 85 ms a step, B = 32)."""
    data = make_data(8, (3, 16, 16), 3)
    with pytest.raises(UnsupportedModelError, match="grad_sample_mode='manual'"):
        ManualPerSample(tiny_vit(), tokens=False)
    for asked, used in ((None, "vmap"), ("manual", "manual")):
        fast = fast_engine(model=copy.deepcopy(tiny_vit()), train_data=data, batch_size=3,
                           optimizer=OptimizerSpec(lr=0.5), dp=DP(noise_multiplier=1.0, max_grad_norm=1.0), seed=3,
                           device="cpu", grad_sample_mode=asked)
        assert isinstance(fast, FastEngine) and fast.grad_sample_mode == used
        assert fast.train_epoch(max_steps=1).steps == 1


class Tokens(nn.Module):
    """LayerNorm without bias, and one normalising two trailing dims, on a Linear's tokens [B, T, d]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.ln, self.ln2 = nn.Linear(4, 6), nn.LayerNorm(6, bias=False), nn.LayerNorm((3, 6))
        self.head = nn.Linear(18, 3)

    def forward(self, x):
        h = self.ln(self.embed(x.reshape(len(x), 3, 4)))  # [B, 3, 6]
        return self.head(torch.tanh(self.ln2(h)).flatten(1))


def test_layer_norm_variants_equal_torch_func():
    """(Opacus's LayerNorm rule needs a bias: the reference is the vmap backend, per-example torch.func gradients.)"""
    torch.manual_seed(1)
    model = Tokens()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    x, y = batch((1, 3, 4), n=7)
    acc = torch.zeros(sum(p.numel() for p in model.parameters()))
    clip = functools.partial(CLIPPING_RULES["flat"].factors, max_grad_norm=C)
    VmapPerSample(model).accumulate(x, y, torch.ones(len(x)), clip, list(acc.split([p.numel() for p in
                                    model.parameters()])), torch.zeros(()), torch.zeros(()))
    assert rel(manual_sum(model, x, y, C)[0], acc.double()) < 1e-6

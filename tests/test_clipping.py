"""Clipping rules: the registry's contract, and automatic clipping (Bu et al. 2023) against a direct computation.

``flat`` against Opacus's own DPOptimizer is ``tests/test_fast_engine.py::test_update_equals_opacus_without_noise``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpvision.engines import FastOptions, OptimizerSpec
from dpvision.engines.clipping import CLIPPING_RULES, get_clipping
from dpvision.engines.fast import FastEngine
from dpvision.seeding import make_generator
from tests.engine_helpers import DP, plan_for
from tests.test_fast_engine import flat, make_data, rel


@pytest.mark.parametrize("name", list(CLIPPING_RULES))
def test_every_rule_bounds_each_contribution_by_c(name):
    """The sensitivity every rule must keep (the accountant assumes it): factor_i * norm_i <= C, factor >= 0."""
    norms = torch.cat([torch.zeros(1), torch.logspace(-8, 8, 200), torch.tensor([1.0, 2.5, 1e30])])
    for c in (1e-4, 0.3, 1.0, 7.0):
        factors = CLIPPING_RULES[name].factors(norms, c)
        assert factors.shape == norms.shape and bool((factors >= 0).all())
        assert bool((factors * norms <= c * (1 + 1e-6)).all()), name


def test_rules_are_the_documented_formulas():
    norms = torch.tensor([0.0, 0.5, 2.0])
    torch.testing.assert_close(CLIPPING_RULES["flat"].factors(norms, 1.0),
                               torch.tensor([1.0, 1.0, 1.0 / (2.0 + 1e-6)]))
    torch.testing.assert_close(CLIPPING_RULES["automatic"].factors(norms, 1.0), 1.0 / (norms + 0.01))
    with pytest.raises(ValueError, match="^clipping must be one of flat, automatic, got 'flatt'"):
        get_clipping("flatt")


def small_convnet() -> nn.Module:
    """Conv2d -> GroupNorm -> ReLU -> Linear: every per-sample backend supports it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def direct_update(model: nn.Module, data, idx: torch.Tensor, c: float, divisor: int) -> torch.Tensor:
    """(Σ_i C / (||g_i|| + 0.01) g_i) / E[B], each g_i by autograd on example i alone."""
    total = None
    for i in idx.tolist():
        model.zero_grad()
        x = data.normalize(data.images[i:i + 1])
        F.cross_entropy(model(x), data.labels[i:i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
        g = g * (c / (g.norm() + 0.01))
        total = g if total is None else total + g
    return total / divisor


@pytest.mark.parametrize("mode", ["manual", "vmap", "hooks"])
def test_automatic_clipping_update_equals_direct_computation(mode):
    data, model = make_data(36, (1, 6, 6), 3), small_convnet()
    c, seed = 0.7, 4
    plan = plan_for(data, 9, DP(noise_multiplier=0.0, max_grad_norm=c), clipping="automatic")  # q = 1/4
    engine = FastEngine(model=copy.deepcopy(model), train_data=data, plan=plan, optimizer=OptimizerSpec(lr=1.0),
                        seed=seed, options=FastOptions(grad_sample_mode=mode))
    assert engine.grad_sample_mode == mode and engine.clipping.name == "automatic"
    engine.train_epoch(max_steps=1)
    mask = torch.rand(1, len(data), generator=make_generator(seed, "sampling")) < plan.sample_rate
    idx = mask[0].nonzero()[:, 0]
    assert len(idx) > 1 and engine.last_batch_sizes == [len(idx)]
    expected = direct_update(copy.deepcopy(model), data, idx, c, plan.expected_batch_size)
    got = flat(model.parameters()) - flat(engine.model.parameters())  # SGD, lr 1: minus the update
    assert rel(got, expected) < 1e-5

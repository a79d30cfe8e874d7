"""The stock Opacus engine: Opacus's sampling conventions and per-sample clipping, on real Opacus."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpvision.data.tensors import ImageTensors
from dpvision.models import SampleConvNet
from dpvision.engines import FastOptions, OpacusEngine, OptimizerSpec, build_engine
from tests.engine_helpers import DP, opacus_engine, plan_for


def random_mnist_like(n: int, seed: int = 0) -> ImageTensors:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return ImageTensors(images, labels, (0.1307,), (0.3081,))


def test_sample_rate_and_steps_follow_opacus_dataloader():
    data = random_mnist_like(1000)
    engine = opacus_engine(model=SampleConvNet(), train_data=data, batch_size=64,
                           optimizer=OptimizerSpec(lr=0.1), dp=DP(noise_multiplier=1.0, max_grad_norm=1.0),
                           seed=0)
    assert engine.sample_rate == 1 / math.ceil(1000 / 64) == 1 / 16
    assert engine.steps_per_epoch == len(engine.loader) == 16
    result = engine.train_epoch()
    assert result.steps == 16
    # Poisson sampling: examples seen is a Binomial(16 * 1000, 1/16) draw, not exactly 1000.
    assert abs(result.examples - 1000) < 6 * math.sqrt(1000 * (1 - 1 / 16))


def test_max_steps_cuts_the_epoch():
    engine = opacus_engine(model=SampleConvNet(), train_data=random_mnist_like(300), batch_size=30,
                           optimizer=OptimizerSpec(lr=0.1), dp=DP(noise_multiplier=1.0, max_grad_norm=1.0),
                           seed=0)
    assert engine.train_epoch(max_steps=3).steps == 3


def test_every_per_sample_gradient_is_clipped_to_c():
    """Recompute per-sample norms from Opacus's grad_sample and check the clipped sum it accumulates."""
    C = 0.05  # far below typical gradient norms, so clipping is active for every example
    engine = opacus_engine(model=SampleConvNet(), train_data=random_mnist_like(256), batch_size=32,
                           optimizer=OptimizerSpec(lr=0.1), dp=DP(noise_multiplier=0.0, max_grad_norm=C),
                           seed=0)
    images, labels = next(iter(engine.loader))
    engine.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(engine._wrapped(images), labels).backward()
    params = [p for p in engine.model.parameters() if p.requires_grad]
    per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)  # [B, P]
    norms = per_sample.norm(dim=1)  # [B]
    factors = (C / (norms + 1e-6)).clamp(max=1.0)
    assert (norms > C).all()
    assert ((norms * factors) <= C * (1 + 1e-6)).all()
    engine.optimizer.clip_and_accumulate()
    summed = torch.cat([p.summed_grad.flatten() for p in params])  # [P]
    expected = (per_sample * factors[:, None]).sum(0)
    torch.testing.assert_close(summed, expected, rtol=1e-5, atol=1e-7)
    assert summed.norm() <= len(labels) * C * (1 + 1e-6)


def test_same_seed_same_weights_and_other_seed_differs():
    def weights(seed: int) -> torch.Tensor:
        torch.manual_seed(123)  # same initial weights: only sampling and noise depend on the seed
        data = random_mnist_like(200)
        engine = build_engine("opacus", model=SampleConvNet(), train_data=data,
                              plan=plan_for(data, 20, DP(noise_multiplier=1.0, max_grad_norm=1.0)),
                              optimizer=OptimizerSpec(lr=0.1), seed=seed)
        engine.train_epoch()
        return torch.cat([p.detach().flatten() for p in engine.model.parameters()])

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_non_private_engine_uses_plain_sgd_batches():
    engine = opacus_engine(model=SampleConvNet(), train_data=random_mnist_like(250), batch_size=100,
                           optimizer=OptimizerSpec(lr=0.1), dp=None, seed=0)
    assert engine.steps_per_epoch == 3
    result = engine.train_epoch()
    assert (result.steps, result.examples) == (3, 250)  # shuffled, every example exactly once


def test_unknown_engine_is_refused():
    data = random_mnist_like(10)
    with pytest.raises(ValueError, match="engine must be one of fast, opacus"):
        build_engine("turbo", model=SampleConvNet(), train_data=data, plan=plan_for(data, 5, None),
                     optimizer=OptimizerSpec(lr=0.1), seed=0)


def test_refuses_what_only_the_fast_engine_has():
    """Fast options, a clipping rule other than flat, an instrument: one line each, naming the field."""
    data, dp = random_mnist_like(20), DP(noise_multiplier=1.0, max_grad_norm=1.0)
    common = dict(model=SampleConvNet(), train_data=data, optimizer=OptimizerSpec(lr=0.1), seed=0)
    with pytest.raises(ValueError, match=r"^cuda_graphs, precision: fast engine options"):
        build_engine("opacus", plan=plan_for(data, 5, dp), options=FastOptions(precision="bf16", cuda_graphs=True),
                     **common)
    with pytest.raises(ValueError, match=r"^clipping must be flat for the opacus engine, got 'automatic'"):
        build_engine("opacus", plan=plan_for(data, 5, dp, clipping="automatic"), **common)
    assert isinstance(build_engine("opacus", plan=plan_for(data, 5, dp), options=FastOptions(), **common),
                      OpacusEngine)

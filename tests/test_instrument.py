"""Audit instrumentation as a plug-in: canaries clipped, sampled and added like examples; the swappable parts."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dpvision.engines import OptimizerSpec
from dpvision.engines.clipping import CLIPPING_RULES
from dpvision.engines.fast import FastEngine
from dpvision.engines.placement import PoissonSampler
from tests.engine_helpers import DP, plan_for
from tests.test_fast_engine import flat, rel, tiny_data, tiny_linear

N, B, C = 400, 20, 1.0  # q = 1/20, 20 steps an epoch


class Recorder:
    """An instrument: fixed raw canary rows; records every block's inclusions and every step's update."""

    def __init__(self, rows: torch.Tensor | None) -> None:
        self.rows, self.included, self.updates = rows, [], []

    def canary_gradients(self):
        return self.rows

    def on_inclusions(self, included: torch.Tensor) -> None:
        self.included.append(included.clone())

    def on_update(self, step: int, update: torch.Tensor) -> None:
        self.updates.append((step, update.clone()))


def engines(rows, sigma: float = 0.0, clipping: str = "flat"):
    """(engine without instrument, engine with a Recorder of ``rows``), same model, data and seed."""
    torch.manual_seed(0)  # the same initial weights on every call
    data, model = tiny_data(N), tiny_linear()
    plan = plan_for(data, B, DP(noise_multiplier=sigma, max_grad_norm=C), clipping=clipping)
    common = dict(train_data=data, plan=plan, optimizer=OptimizerSpec(lr=1.0), seed=1)
    recorder = Recorder(rows)
    return (FastEngine(model=copy.deepcopy(model), **common),
            FastEngine(model=copy.deepcopy(model), instrument=recorder, **common), recorder)


def raw_rows(m: int = 300) -> torch.Tensor:
    """m raw rows of norms between 0.1 C and 10 C: the long ones must be clipped, the short ones kept."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(m, 10, generator=g)  # tiny_linear: 10 parameters
    return rows / rows.norm(dim=1, keepdim=True) * torch.logspace(-1, 1, m).unsqueeze(1) * C


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_canaries_are_clipped_by_the_rule_and_added_before_the_noise(clipping):
    rows = raw_rows()
    plain, audited, recorder = engines(rows, clipping=clipping)
    before = flat(audited.model.parameters())
    plain.train_epoch(max_steps=1)
    audited.train_epoch(max_steps=1)
    included = recorder.included[0][0]  # [m] of the one step
    factors = CLIPPING_RULES[clipping].factors(rows.norm(dim=1), C)  # [m]
    expected = -(included.double() * factors.double()) @ rows.double() / audited.plan.expected_batch_size
    diff = flat(audited.model.parameters()) - flat(plain.model.parameters())  # the real examples cancel
    assert included.sum() > 0 and rel(diff, expected) < 1e-5
    assert bool((factors * rows.norm(dim=1) <= C * (1 + 1e-6)).all())
    (step, update), = recorder.updates  # what the optimizer was handed: SGD, lr 1
    assert step == 0 and rel(update.double(), before - flat(audited.model.parameters())) < 1e-6


def test_canaries_follow_the_engines_sampler_at_q():
    _, audited, recorder = engines(raw_rows())
    audited.train_epoch()
    included = torch.cat(recorder.included)  # [20 steps, 300]
    q = audited.plan.sample_rate
    assert included.shape == (20, 300) and [s for s, _ in recorder.updates] == list(range(20))
    assert abs(float(included.float().mean()) - q) < 5 * math.sqrt(q * (1 - q) / included.numel())


class Everyone(PoissonSampler):
    """A broken sampler (the audit harness's kind): every example and every canary at every step."""

    def draw(self, steps: int, n: int) -> torch.Tensor:
        super().draw(steps, n)  # the stream advances as before
        return torch.ones(steps, n, dtype=torch.bool)


def test_a_swapped_sampler_samples_the_examples_and_the_canaries():
    _, audited, recorder = engines(raw_rows(10))
    audited.sampler = Everyone(audited.plan.sample_rate, audited.sampler.generator)
    audited.train_epoch(max_steps=3)
    assert audited.last_batch_sizes == [N] * 3 and bool(torch.cat(recorder.included).all())


def test_a_swapped_clipping_rule_is_used_by_the_next_step():
    flat_engine, _, _ = engines(None)
    automatic, _, _ = engines(None, clipping="automatic")
    flat_engine.clipping = CLIPPING_RULES["automatic"]
    flat_engine.train_epoch(max_steps=2)
    automatic.train_epoch(max_steps=2)
    assert torch.equal(flat(flat_engine.model.parameters()), flat(automatic.model.parameters()))


def test_an_instrument_without_canaries_still_sees_every_update():
    plain, audited, recorder = engines(None, sigma=1.0)  # with noise: the update is noisy, and the same bytes
    plain.train_epoch(max_steps=2)
    audited.train_epoch(max_steps=2)
    assert recorder.included == [] and [s for s, _ in recorder.updates] == [0, 1]
    assert torch.equal(flat(plain.model.parameters()), flat(audited.model.parameters()))


def test_instrument_needs_dp_and_canary_rows_of_the_models_size():
    data = tiny_data(N)
    with pytest.raises(ValueError, match="^an instrument needs DP in a single process"):
        FastEngine(model=tiny_linear(), train_data=data, plan=plan_for(data, B, None),
                   optimizer=OptimizerSpec(lr=1.0), seed=0, instrument=Recorder(None))
    with pytest.raises(ValueError, match=r"^canary_gradients must be \[m, 10\], got \(3, 6\)"):
        FastEngine(model=tiny_linear(), train_data=data, plan=plan_for(data, B, DP(1.0, C)),
                   optimizer=OptimizerSpec(lr=1.0), seed=0, instrument=Recorder(torch.ones(3, 6)))

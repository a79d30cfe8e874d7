"""The engines run the plan: its epoch length, its schedule length, its E[B] (issue 19's 92/93 steps)."""

from __future__ import annotations

import pytest
import torch

from dpvision.engines import OptimizerSpec, build_engine
from dpvision.engines.fast import FastEngine
from dpvision.engines.schedule import lr_at
from dpvision.jobs.config import DPConfig, OptimConfig, TrainConfig
from dpvision.jobs.setup import plan_privacy
from dpvision.privacy.plan import DPSettings, make_plan
from tests.engine_helpers import DP, plan_for
from tests.test_fast_engine import make_data, tiny_data, tiny_linear

N, B = 23_808, 256  # ceil(N / B) = 93 batches; Opacus's int(1 / q) = 92 Poisson steps


def record_lrs(engine) -> list[float]:
    """The learning rate of every optimizer step the engine takes from now on."""
    lrs = []
    engine.optimizer.register_step_post_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    return lrs


@pytest.mark.parametrize("engine_name", ["fast", "opacus"])
def test_non_dp_cosine_schedule_ends_exactly_at_the_last_step(engine_name):
    """Without DP an epoch is ceil(N / B) = 93 batches: the plan, the engine and the schedule agree (the old
    plan said 92, so the 93rd step ran at lr 0)."""
    config = TrainConfig(dp=DPConfig(enabled=False), optim=OptimConfig(batch_size=B, epochs=1, schedule="cosine"))
    plan = plan_privacy(config, num_train=N)
    assert (plan.steps_per_epoch, plan.total_steps) == (93, 93)
    spec = OptimizerSpec(lr=1.0, schedule="cosine")
    engine = build_engine(engine_name, model=tiny_linear(), train_data=tiny_data(N), plan=plan, optimizer=spec,
                          seed=0)
    lrs = record_lrs(engine)
    result = engine.train_epoch()
    assert result.steps == engine.steps_per_epoch == plan.steps_per_epoch == 93 and result.examples == N
    assert len(lrs) == 93 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    assert lrs[-1] == lr_at(92, base_lr=1.0, schedule="cosine", warmup_steps=0, total_steps=93)
    assert lr_at(93, base_lr=1.0, schedule="cosine", warmup_steps=0, total_steps=93) == 0.0


def test_dp_epoch_and_warmup_come_from_the_plan():
    plan = make_plan(DPSettings(noise_multiplier=1.0), num_train=N, batch_size=B, epochs=2, warmup_epochs=0.5)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (92, 184, 46)
    engine = FastEngine(model=tiny_linear(), train_data=tiny_data(N), plan=plan,
                        optimizer=OptimizerSpec(lr=1.0, schedule="cosine"), seed=0)
    lrs = record_lrs(engine)
    assert engine.train_epoch(max_steps=48).steps == 48
    # Warm-up over the plan's 46 steps, then the cosine over the plan's 184 - 46.
    assert lrs[0] == 1.0 / 46 and lrs[45] == lrs[46] == 1.0 and lrs[47] < 1.0


def test_engine_refuses_data_the_plan_was_not_made_for():
    with pytest.raises(ValueError, match="train_data has 50 examples, the plan was made for 60"):
        FastEngine(model=tiny_linear(), train_data=tiny_data(50), plan=plan_for(60, 10, DP(1.0, 1.0)),
                   optimizer=OptimizerSpec(lr=0.1), seed=0)


def test_divisor_is_the_plans_expected_batch_size():
    """σ = 0, lr = 1, every example sampled (B = N, q = 1): the update is minus the clipped sum / E[B]."""
    data = make_data(12, (1, 2, 2), 2)
    plan = plan_for(data, 12, DP(noise_multiplier=0.0, max_grad_norm=1e-3))  # C tiny: every gradient clipped
    engine = FastEngine(model=tiny_linear(), train_data=data, plan=plan, optimizer=OptimizerSpec(lr=1.0), seed=0)
    before = torch.cat([p.detach().flatten() for p in engine.model.parameters()])
    engine.train_epoch()
    after = torch.cat([p.detach().flatten() for p in engine.model.parameters()])
    assert plan.expected_batch_size == 12 and engine.last_batch_sizes == [12]
    # Twelve clipped gradients of norm C (up to 1e-6 relative) summed, divided by 12: norm <= C.
    assert float((before - after).norm()) <= 1e-3 * (1 + 1e-5)

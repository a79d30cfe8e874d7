"""The "too few steps" advice (issue 21, item 6): its settings really give enough steps, and the numbers it
prints (steps, learning rate, ε) are the ones those settings give. No training here: arithmetic only."""

from __future__ import annotations

import math
import re

import pytest

from dpvision.jobs.config import TrainConfig
from dpvision.jobs.setup import MIN_SENSIBLE_STEPS, few_steps_advice, plan_privacy
from dpvision.privacy.accounting import compute_epsilon, poisson_sample_rate, steps_per_epoch

ADVICE = re.compile(r"only (\d+) optimizer steps \((\d+) epochs of (\d+) steps, batch size (\d+) for (\d+) examples\): "
                    r"too few to learn; try --batch-size (\d+) --epochs (\d+)(?: --lr (\S+))? \((\d+) steps(.*)\)")


def advise(n: int, batch: int, epochs: int, *, dp: dict | None = None, lr: float = 0.1):
    config = TrainConfig.from_dict({"optim": {"batch_size": batch, "epochs": epochs, "lr": lr},
                                    "dp": dp if dp is not None else {"delta": "auto"}})
    plan = plan_privacy(config, num_train=n)
    return config, plan, few_steps_advice(config, plan)


CASES = [(630, 256, 10), (482, 256, 10), (40, 20, 2), (2000, 256, 5), (5000, 1024, 3), (300, 64, 1), (100, 100, 1)]


@pytest.mark.parametrize("n,batch,epochs", CASES)
@pytest.mark.parametrize("dp", [True, False])
def test_the_advised_settings_give_enough_steps(n, batch, epochs, dp):
    config, plan, advice = advise(n, batch, epochs)
    if not dp:
        config = config.deactivated()
        plan = plan_privacy(config, num_train=n)
        advice = few_steps_advice(config, plan)
    found = ADVICE.fullmatch(advice)
    assert found, advice
    total, e0, per0, b0, n0, b1, e1, lr, steps, _ = found.groups()
    assert (int(total), int(e0), int(per0), int(b0), int(n0)) == (epochs * plan.steps_per_epoch, epochs,
                                                                  plan.steps_per_epoch, batch, n)
    b1, e1, steps = int(b1), int(e1), int(steps)
    per_epoch = steps_per_epoch(poisson_sample_rate(n, b1))  # what the job will run with the advised batch
    assert steps == e1 * per_epoch >= MIN_SENSIBLE_STEPS
    assert e1 >= epochs and lr is None
    assert few_steps_advice(*_advised(config, n, b1, e1)) is None  # following it silences it
    if dp:  # DP keeps the batch: a smaller one makes every step noisier (noise std σC/B on the mean gradient)
        assert b1 == batch and e1 == math.ceil(MIN_SENSIBLE_STEPS / plan.steps_per_epoch)
    else:
        assert min(batch, 32) // 2 < b1 <= batch


def _advised(config: TrainConfig, n: int, batch: int, epochs: int):
    advised = config.with_overrides({"optim.batch_size": batch, "optim.epochs": epochs})
    return advised, plan_privacy(advised, num_train=n)


def test_enough_steps_gives_no_advice():
    assert advise(30_000, 256, 30)[2] is None
    assert advise(482, 32, 13)[2] is None


def test_dp_advice_states_the_epsilon_of_the_advised_run():
    config, plan, advice = advise(630, 256, 10)
    found = ADVICE.fullmatch(advice)
    b1, e1 = int(found.group(6)), int(found.group(7))
    q = poisson_sample_rate(630, b1)
    epsilon = compute_epsilon([(1.0, q, e1 * steps_per_epoch(q))], delta=plan.delta)
    assert found.group(10) == (f"; under DP a smaller batch makes every step noisier; ε = {epsilon:.3g} at δ = "
                               f"{plan.delta:.2g} with σ = 1; with 630 examples DP-SGD may not learn at a useful ε: "
                               "more data helps most")
    assert math.isclose(plan.delta, 1 / 6300)


def test_dp_advice_with_a_target_epsilon_says_sigma_is_recalibrated():
    advice = advise(630, 256, 10, dp={"target_epsilon": 8.0, "delta": "auto"})[2]
    assert advice.endswith("--epochs 67 (201 steps; under DP a smaller batch makes every step noisier; σ is "
                           "recalibrated to end at ε = 8, so each step gets noisier too; with 630 examples DP-SGD may "
                           "not learn at a useful ε: more data helps most)")

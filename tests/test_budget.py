"""--max-epsilon: the exact step where ε would first exceed the budget, and a run that stops there."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from dpvision.data.tensors import ImageTensors
from dpvision.mnist import MnistConfig, run
from dpvision.privacy.accounting import PrivacyLedger, compute_epsilon
from dpvision.privacy.budget import PrivacyBudget, steps_within_budget
from dpvision.engines import DPSettings, Engine, EpochResult
from dpvision.jobs.loop import train_private_epoch


def opacus_rdp(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=delta)


def test_exact_first_exceeding_step_rdp():
    n = steps_within_budget(PrivacyLedger(), noise_multiplier=1.0, sample_rate=0.01, planned=100_000,
                            max_epsilon=1.0, delta=1e-5)
    # Independent check straight against Opacus: step n fits, step n + 1 is the first to exceed.
    assert opacus_rdp(1.0, 0.01, n) <= 1.0 < opacus_rdp(1.0, 0.01, n + 1)
    assert n == 4  # pinned (RDP is loose for few steps): would change only if Opacus changed


@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_exact_first_exceeding_step_other_accountants(accountant):
    ledger = PrivacyLedger()
    ledger.record(noise_multiplier=1.2, sample_rate=0.02, steps=300)
    budget = PrivacyBudget(max_epsilon=2.0, delta=1e-5, accountant=accountant)
    n = budget.allowed_steps(ledger, noise_multiplier=1.2, sample_rate=0.02, planned=10_000)
    assert 0 < n < 10_000
    fits = compute_epsilon([(1.2, 0.02, 300 + n)], delta=1e-5, accountant=accountant)
    over = compute_epsilon([(1.2, 0.02, 300 + n + 1)], delta=1e-5, accountant=accountant)
    assert fits <= 2.0 < over


def test_budget_edge_cases():
    ledger = PrivacyLedger()
    assert steps_within_budget(ledger, noise_multiplier=1.0, sample_rate=0.01, planned=10, max_epsilon=50,
                               delta=1e-5) == 10
    ledger.record(noise_multiplier=0.5, sample_rate=0.5, steps=100)
    assert steps_within_budget(ledger, noise_multiplier=1.0, sample_rate=0.01, planned=10, max_epsilon=1.0,
                               delta=1e-5) == 0
    with pytest.raises(ValueError, match="--max-epsilon"):
        PrivacyBudget(max_epsilon=0.0, delta=1e-5)
    with pytest.raises(ValueError, match="--accountant"):
        PrivacyBudget(max_epsilon=1.0, delta=1e-5, accountant="moments")


class CountingEngine(Engine):
    """Takes steps without training: enough to test the loop's budget logic."""

    name = "counting"

    def __init__(self, n: int, batch_size: int, sigma: float) -> None:
        data = ImageTensors(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), (0.5,), (0.25,))
        super().__init__(train_data=data, batch_size=batch_size, dp=DPSettings(noise_multiplier=sigma, max_grad_norm=1.0),
                         seed=0, device="cpu")
        self.calls: list[int | None] = []

    def train_epoch(self, *, max_steps=None, progress=None) -> EpochResult:
        self.calls.append(max_steps)
        steps = self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch)
        return EpochResult(loss=0.0, accuracy=0.0, steps=steps, examples=0)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def test_loop_stops_before_first_exceeding_step():
    engine = CountingEngine(n=1000, batch_size=10, sigma=1.3)  # q = 0.01, 100 steps an epoch
    ledger, budget = PrivacyLedger(), PrivacyBudget(max_epsilon=1.0, delta=1e-5)
    outcomes = [train_private_epoch(engine, ledger, noise_multiplier=1.3, budget=budget) for _ in range(7)]
    assert [o.steps for o in outcomes] == [100] * 5 + [96, 0]
    assert engine.calls == [None] * 5 + [96]  # the short epoch asks the engine for exactly 96 steps
    assert [o.stopped for o in outcomes] == [False] * 5 + [True, True] and outcomes[6].result is None
    assert ledger.steps == 596 and "--max-epsilon 1" in outcomes[5].stop_reason
    assert opacus_rdp(1.3, 0.01, 596) <= 1.0 < opacus_rdp(1.3, 0.01, 597)


def test_mnist_run_stops_and_says_why(tmp_path, mnist_root):
    # q = 0.1, 10 steps an epoch, σ = 1.3: ε after 10 steps ≈ 1.16, after 20 ≈ 1.53.
    budget = (opacus_rdp(1.3, 0.1, 14) + opacus_rdp(1.3, 0.1, 15)) / 2
    config = MnistConfig(k=300, batch_size=30, epochs=3, max_epsilon=budget, data_root=str(mnist_root),
                         out_dir=str(tmp_path / "out"), runs_dir=str(tmp_path / "runs"), quiet=True,
                         test_batch_size=2000)
    summary = run(config)
    assert summary["stopped_early"] is True and summary["steps"] == 14 and summary["epochs_completed"] == 2
    assert "privacy budget" in summary["stop_reason"]
    assert summary["epsilon"] == pytest.approx(opacus_rdp(1.3, 0.1, 14), rel=1e-12) and summary["epsilon"] <= budget
    on_disk = json.loads((tmp_path / "runs" / "mnist" / "mnist_0.15_1.3_1.0_30_3_0.3_300" / "summary.json").read_text())
    assert on_disk["stopped_early"] is True and on_disk["stop_reason"] == summary["stop_reason"]
    assert set(on_disk["epsilons"]) == {"rdp", "prv", "pld"} and math.isfinite(on_disk["epsilons"]["pld"])

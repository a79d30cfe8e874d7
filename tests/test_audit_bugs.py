"""Bug injection: the white-box audit run against deliberately broken DP-SGD must FAIL; the correct run PASSes.

The broken variants exist only here (``run_audit``'s ``tamper`` argument; no command-line flag reaches
it). Each tamper breaks one piece of the engine after it is built:

the fast engine's swappable pieces (``engine.sampler``, ``engine.clipping``, ``engine.noise_std()``,
:mod:`dpvision.engines.instrument`) are replaced, so the canaries go through the same broken sampler /
clipping / noise as the real examples.

CI-sized: linear model, 500 MNIST images, expected batch 50 (q = 0.1), 4 epochs (40 steps), 6,000
canaries (the ~3,000 included ones are [3000, 13850] rows: 170 MB), claimed ε = 4 (RDP), δ = 1e-5, CPU.
"""

from __future__ import annotations

import pytest
import torch

from dpvision.audit import AuditConfig, run_audit

pytestmark = pytest.mark.slow

CI = dict(mode="white", model="linear", canaries=6000, k=500, batch_size=50, epochs=4, lr=0.1, delta=1e-5,
          epsilon=4.0, seed=0)
# Flagged (FAIL) at CI size. The subtle bugs raise the bound well above the correct run's but sit at the edge
# of what a one-run audit of 6,000 canaries can certify at claimed ε = 4 (docs/privacy.md, "What a one-run
# audit can reach"): noise x 0.5 fails with seed 0, just (xfail, not strict).
STRONG = ("noise_off", "clipping_off", "clipping_2c")
SUBTLE = ("noise_half", "accountant_half_q", "shuffled_batches")


class _ShuffledSampler:
    """Fixed-size batches from a fresh permutation every epoch (what the accountant is NOT told)."""

    def __init__(self, sample_rate: float, seed: int = 0) -> None:
        self.sample_rate = sample_rate
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: dict[int, list[int]] = {}

    def draw(self, steps: int, n: int) -> torch.Tensor:
        batch = max(1, round(self.sample_rate * n))
        out = torch.zeros(steps, n, dtype=torch.bool)
        for s in range(steps):
            pending = self.queue.setdefault(n, [])
            if len(pending) < batch:
                pending[:] = torch.randperm(n, generator=self.generator).tolist()
            out[s, pending[:batch]] = True
            del pending[:batch]
        return out


class _PoissonSampler:
    def __init__(self, sample_rate: float, seed: int = 0) -> None:
        self.sample_rate = sample_rate
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, steps: int, n: int) -> torch.Tensor:
        return torch.rand(steps, n, generator=self.generator) < self.sample_rate


class _ClipAt:
    """The engine's own rule, applied at ``scale`` x C (None: no clipping at all)."""

    def __init__(self, rule, scale: float | None) -> None:
        self.rule, self.scale = rule, scale

    def factors(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        if self.scale is None:
            return torch.ones_like(norms)
        return self.rule.factors(norms, self.scale * max_grad_norm)


def _section3(engine, bug: str) -> None:
    noise_std, q = engine.noise_std, engine.plan.sample_rate
    if bug == "noise_off":
        engine.noise_std = lambda: 0.0
    elif bug == "noise_half":
        engine.noise_std = lambda: 0.5 * noise_std()
    elif bug in ("clipping_off", "clipping_2c"):
        engine.clipping = _ClipAt(engine.clipping, None if bug == "clipping_off" else 2.0)
    elif bug == "shuffled_batches":
        engine.sampler = _ShuffledSampler(q)
    else:  # the accountant is told q while the sampler draws at 2q
        engine.sampler = _PoissonSampler(2 * q)


def _tamper(bug: str):
    def tamper(engine) -> None:
        _section3(engine, bug)
    return tamper


@pytest.fixture(scope="module")
def correct_run(mnist_root):
    return run_audit(AuditConfig(**CI, data_root=str(mnist_root)))


def test_correct_run_passes(correct_run):
    assert correct_run["verdict"] == "PASS"
    assert correct_run["epsilon_lower_bound"] <= correct_run["epsilon"]
    assert correct_run["epsilon_lower_bound"] > 0.5  # the attack is not empty


@pytest.fixture(scope="module")
def broken_runs(mnist_root):
    return {}


def _broken(bug: str, mnist_root, cache: dict) -> dict:
    if bug not in cache:
        cache[bug] = run_audit(AuditConfig(**CI, data_root=str(mnist_root)), tamper=_tamper(bug))
    return cache[bug]


# Shuffled fixed-size batches reported as Poisson: each canary is then in exactly one batch an epoch, which at
# σ ≈ 1.2 and q = 0.1 a one-run audit of 6,000 canaries cannot tell from Poisson sampling (measured: f-DP bound
# 1.23 against the correct run's 1.17). It stays in the suite as a known miss, not a pass.
@pytest.mark.parametrize("bug", STRONG + ("noise_half", "accountant_half_q", pytest.param(
    "shuffled_batches", marks=pytest.mark.xfail(reason="not visible to a one-run audit at CI size", strict=True))))
def test_injected_bug_raises_the_bound(bug, mnist_root, correct_run, broken_runs):
    result = _broken(bug, mnist_root, broken_runs)
    assert result["epsilon"] == pytest.approx(correct_run["epsilon"])  # the claim is unchanged
    assert result["fdp"]["epsilon_lower_bound"] > correct_run["fdp"]["epsilon_lower_bound"] + 0.3, bug


@pytest.mark.parametrize("bug", STRONG)
def test_strong_bug_fails(bug, mnist_root, broken_runs):
    result = _broken(bug, mnist_root, broken_runs)
    assert result["verdict"] == "FAIL" and result["epsilon_lower_bound"] > result["epsilon"], bug


@pytest.mark.xfail(reason="at the edge of a one-run audit of 6,000 canaries at claimed epsilon = 4", strict=False)
@pytest.mark.parametrize("bug", SUBTLE)
def test_subtle_bug_fails(bug, mnist_root, broken_runs):
    assert _broken(bug, mnist_root, broken_runs)["verdict"] == "FAIL", bug


def test_cli_prints_fail_and_exits_1_on_a_broken_run(tmp_path, mnist_root, monkeypatch, capsys):
    """The command line's FAIL path: the harness swaps in a tampered run (no flag can)."""
    import functools
    import json

    import dpvision.audit
    from dpvision.cli import main

    monkeypatch.setattr(dpvision.audit, "run_audit", functools.partial(run_audit, tamper=_tamper("noise_off")))
    code = main(["audit", "--model", "linear", "--k", "500", "--batch-size", "50", "--epochs", "4", "--lr", "0.1",
                 "--canaries", "1000", "--epsilon", "4", "--quiet", "--data-root", str(mnist_root),
                 "--runs-dir", str(tmp_path), "--name", "broken"])
    out = capsys.readouterr().out
    assert code == 1 and out.startswith("FAIL: audit (white-box, all iterates, m=1000 canaries")
    assert "leaks more than its accountant claims" in out and f"Outputs: {tmp_path / 'audit' / 'broken'}/" in out
    data = json.loads((tmp_path / "audit" / "broken" / "audit.json").read_text())
    assert data["verdict"] == "FAIL" and data["epsilon_lower_bound"] > data["epsilon"]

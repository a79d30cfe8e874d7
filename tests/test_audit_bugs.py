"""Bug injection: the white-box audit run against deliberately broken DP-SGD must FAIL; the correct run PASSes.

The broken variants exist only here (``run_audit``'s ``tamper`` argument; no command-line flag reaches
it). Each tamper replaces one of the fast engine's swappable pieces after it is built (``engine.sampler``,
``engine.clipping``, ``engine.noise_std()``; INTERFACES.md §3), so the canaries go through the same broken
sampler / clipping / noise as the real examples.

CI-sized settings (stated in docs/privacy.md): linear model, 500 MNIST images, expected batch 250 (q = 0.5),
one epoch (T = 2 steps), 20,000 Dirac canaries (the ~10,000 included ones are [10000, 27850] rows: 1.1 GB),
claimed ε = 4 (PLD accountant, σ = 1.146), δ = 1e-5, CPU. q = 0.5 rather than the tightness audit's q = 1
because two of the bugs are about sampling, which q = 1 cannot show.

Measured (seed 0): the correct run PASSes with ε >= 2.73 and both mechanism checks within 1.2 standard deviations;
noise off, noise x 0.5, clipping off and clipping at 2C FAIL through the f-DP test (the claimed curve rejected, at
the ceiling of what 140 guesses certify: bounds in docs/privacy.md) and, with a wide margin, through the noise
check (z = -100, -75) or the clipping check (z = +169, +56; the level needs about 3.3); shuffled fixed-size
batches and a doubled q FAIL through the sampling check (336/400 and 382/400 lowest-scored canaries out, where
Poisson sampling at q = 0.5 allows 77.8%), their two-sided bounds staying below ε; the doubled q also through
the clipping check (z = +56). Shuffling is at the edge of what 20,000 canaries can see at σ = 1.15 (p = 0.002 at
level 0.016; docs/privacy.md gives its power over seeds).
"""

from __future__ import annotations

import pytest
import torch

from dpvision.audit import AuditConfig, run_audit
from dpvision.audit.cli import summary_lines

pytestmark = pytest.mark.slow

CI = dict(mode="white", model="linear", canaries=20_000, k=500, batch_size=250, epochs=1, lr=0.1, delta=1e-5,
          epsilon=4.0, accountant="pld", seed=0)
BUGS = ("noise_off", "noise_half", "clipping_off", "clipping_2c", "accountant_half_q", "shuffled_batches")


class _ShuffledSampler:
    """Fixed-size batches: every epoch of round(1 / q) steps splits a fresh permutation of the n rows into that
    many near-equal batches (what the accountant is NOT told): each row is in exactly one batch an epoch."""

    def __init__(self, sample_rate: float, seed: int = 0) -> None:
        self.steps_per_epoch = round(1 / sample_rate)
        self.generator = torch.Generator().manual_seed(seed)
        self.epochs: dict[int, tuple[int, list[torch.Tensor]]] = {}  # n -> (next step, the epoch's batches)

    def draw(self, steps: int, n: int) -> torch.Tensor:
        out = torch.zeros(steps, n, dtype=torch.bool)
        for s in range(steps):
            step, batches = self.epochs.get(n, (0, []))
            if step == len(batches):  # a new epoch
                step, batches = 0, list(torch.randperm(n, generator=self.generator).tensor_split(self.steps_per_epoch))
            out[s, batches[step]] = True
            self.epochs[n] = (step + 1, batches)
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
    assert correct_run["epsilon_lower_bound"] > 2.0  # the attack is not empty: measured 2.73 (0.68 ε)
    assert not correct_run["sampling"]["rejects_claim"] and not correct_run["fdp"]["rejects_claim"]


@pytest.fixture(scope="module")
def broken_runs():
    return {}


def _broken(bug: str, mnist_root, cache: dict, **changes) -> dict:
    key = (bug, tuple(sorted(changes.items())))
    if key not in cache:
        cache[key] = run_audit(AuditConfig(**{**CI, **changes}, data_root=str(mnist_root)), tamper=_tamper(bug))
    return cache[key]


@pytest.mark.parametrize("bug", BUGS)
def test_injected_bug_fails_at_claimed_epsilon_4(bug, mnist_root, correct_run, broken_runs):
    result = _broken(bug, mnist_root, broken_runs)
    assert result["epsilon"] == pytest.approx(correct_run["epsilon"])  # the claim is unchanged
    assert result["verdict"] == "FAIL", bug


@pytest.mark.parametrize("bug,check", [("noise_off", "noise"), ("noise_half", "noise"), ("clipping_off", "clipping"),
                                       ("clipping_2c", "clipping"), ("accountant_half_q", "clipping")])
def test_noise_and_clipping_bugs_are_flagged_by_the_mechanism_checks(bug, check, mnist_root, correct_run,
                                                                     broken_runs):
    """Not at the edge of what 140 guesses certify: the checks reject these claims by a wide margin (p far below
    their level 0.0005), while the correct run passes both."""
    result = _broken(bug, mnist_root, broken_runs)
    assert result["checks"][check]["rejects_claim"] and result["checks"][check]["p_value"] < 1e-30, bug
    assert not any(c["rejects_claim"] for c in correct_run["checks"].values())
    assert abs(correct_run["checks"]["noise"]["spread_ratio"] - 1) < 0.03


def test_sampling_bugs_are_caught_by_the_out_guesses(mnist_root, broken_runs):
    """Fixed-size batches and a doubled q leave no included canary unsampled, so the lowest-scored canaries are
    "out" more often than Poisson sampling at the claimed q allows, though the two-sided bounds stay below ε."""
    for bug in ("shuffled_batches", "accountant_half_q"):
        result = _broken(bug, mnist_root, broken_runs)
        sampling = result["sampling"]
        assert sampling["rejects_claim"] and sampling["correct"] > sampling["ceiling"] * sampling["k_minus"], bug
        assert not result["fdp"]["rejects_claim"] and result["epsilon_lower_bound"] < result["epsilon"], bug
        lines = summary_lines(result, "runs/audit/x")
        assert lines[0].startswith("FAIL: audit (white-box, all iterates, m=20000 canaries")
        assert "REJECTED, the run does not sample as claimed" in lines[2] and "allows 77.8%" in lines[2], bug


def test_cli_prints_fail_and_exits_1_on_a_broken_run(tmp_path, mnist_root, monkeypatch, capsys):
    """The command line's FAIL path: the harness swaps in a tampered run (no flag can)."""
    import functools
    import json

    import dpvision.audit
    from dpvision.cli import main

    monkeypatch.setattr(dpvision.audit, "run_audit", functools.partial(run_audit, tamper=_tamper("noise_off")))
    code = main(["audit", "--model", "linear", "--k", "500", "--batch-size", "500", "--epochs", "2", "--lr", "0.1",
                 "--canaries", "1000", "--epsilon", "4", "--quiet", "--data-root", str(mnist_root),
                 "--runs-dir", str(tmp_path), "--name", "broken"])
    out = capsys.readouterr().out
    assert code == 1 and out.startswith("FAIL: audit (white-box, all iterates, m=1000 canaries")
    assert "leaks more than its accountant claims" in out and f"Outputs: {tmp_path / 'audit' / 'broken'}/" in out
    data = json.loads((tmp_path / "audit" / "broken" / "audit.json").read_text())
    assert data["verdict"] == "FAIL" and data["epsilon_lower_bound"] > data["epsilon"]

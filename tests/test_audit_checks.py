"""The audit's mechanism checks (noise, clipping): level under the claim, power against the injected bugs."""

from __future__ import annotations

import numpy as np
import pytest

from dpvision.audit import AuditConfig, analyse, run_audit
from dpvision.audit.analysis import Claim
from dpvision.audit.checks import ROUNDING_SLACK, contribution_p_value, mechanism_checks
from dpvision.audit.cli import summary_lines
from dpvision.audit.design import canary_scores, simulate_observations
from tests.test_audit_bugs import _tamper


def _observations(rng, *, m: int, q: float, sigma: float, steps: int, contribution: float = 1.0,
                  noise_scale: float = 1.0, sample_scale: float = 1.0):
    """The claimed mechanism on m Dirac canaries, optionally broken: x [T, m] and the truth [m]."""
    truth = rng.random(m) < 0.5
    sampled = (rng.random((steps, m)) < min(1.0, q * sample_scale)) & truth  # [T, m]
    return contribution * sampled + noise_scale * sigma * rng.standard_normal((steps, m)), truth


@pytest.mark.parametrize("q,score", [(0.5, "steps"), (0.5, "final"), (1.0, "steps")])
def test_checks_false_fail_rate_is_within_their_level(q, score):
    """300 correct runs at level 0.1: each check rejects about 10% (the χ² and the binomial-plus-Gaussian tails
    are exact, not merely conservative) and never much more."""
    rng = np.random.default_rng(3)
    rejected = {"noise": 0, "clipping": 0}
    for _ in range(300):
        x, truth = _observations(rng, m=300, q=q, sigma=2.0, steps=3)
        checks = mechanism_checks(x, truth, score=score, sample_rate=q, noise_multiplier=2.0, level=0.1)
        for name in rejected:
            rejected[name] += checks[name]["rejects_claim"]
    assert 15 <= rejected["noise"] <= 45 and 12 <= rejected["clipping"] <= 45, rejected


def test_contribution_tail_matches_simulation():
    """The clipping check's p-value is the exact upper tail of Binomial(n, q) + N(0, n σ²) (up to the slack)."""
    rng = np.random.default_rng(0)
    n, q, sigma = 400, 0.3, 0.5
    draws = rng.binomial(n, q, 200_000) + sigma * np.sqrt(n) * rng.standard_normal(200_000)
    threshold = np.quantile(draws, 0.99)
    p = contribution_p_value(threshold, count=n, sample_rate=q, noise_multiplier=sigma)
    assert p == pytest.approx(0.01, rel=0.1)
    assert contribution_p_value(n * (1 + ROUNDING_SLACK), count=n, sample_rate=1.0, noise_multiplier=0.0) == 1.0


@pytest.mark.parametrize("bug,check", [("noise_half", "noise"), ("clipping_2c", "clipping"),
                                       ("rate_2q", "clipping")])
def test_simulated_bugs_are_flagged_by_their_check(bug, check):
    """The suite's claim (σ = 1.146, q = 0.5, T = 2) at 2,000 canaries: each bug far beyond the checks' level."""
    rng = np.random.default_rng(1)
    broken = {"noise_half": {"noise_scale": 0.5}, "clipping_2c": {"contribution": 2.0},
              "rate_2q": {"sample_scale": 2.0}}[bug]
    x, truth = _observations(rng, m=2000, q=0.5, sigma=1.146, steps=2, **broken)
    checks = mechanism_checks(x, truth, score="steps", sample_rate=0.5, noise_multiplier=1.146, level=5e-4)
    assert checks[check]["p_value"] < 1e-12, checks
    other = "clipping" if check == "noise" else "noise"
    assert not checks[other]["rejects_claim"], checks


def test_checks_without_canaries_on_one_side_pass_and_print():
    """All canaries in (or all out): the check with nothing to look at passes; the summary line still prints."""
    x = np.random.default_rng(0).standard_normal((2, 3))
    for truth in (np.ones(3, bool), np.zeros(3, bool)):
        checks = mechanism_checks(x, truth, score="steps", sample_rate=0.5, noise_multiplier=1.0, level=0.01)
        assert not any(check["rejects_claim"] for check in checks.values())
        line = summary_lines({"steinke": {"epsilon_lower_bound": 0.0, "correct": 0, "guesses": 0},
                              "fdp": {"at_floor": False, "epsilon_lower_bound": 0.0, "correct": 0, "guesses": 0,
                                      "rejects_claim": False}, "sampling": {"k_minus": 0}, "checks": checks,
                              "epsilons": {}, "verdict": "PASS", "threat_model": "t", "canaries": 3,
                              "canaries_included": int(truth.sum()), "epsilon_lower_bound": 0.0, "confidence": 0.95,
                              "analysis": "fdp", "epsilon": 1.0, "accountant": "pld", "delta": 1e-5,
                              "sample_rate": 0.5, "steps": 2, "epsilon_claimed_curve_pld": 1.0,
                              "plan": {"expected_fdp": 0.0}}, "x")[2]
        assert line.startswith("  mechanism checks") and line.count(": passes") == 2


def test_checks_join_the_verdict_and_the_levels_add_up():
    claim = Claim(noise_multiplier=1.146, sample_rate=0.5, steps=2, delta=1e-5)
    rng = np.random.default_rng(2)
    x, truth = simulate_observations(rng, m=4000, sample_rate=0.5, noise_multiplier=1.146 * 0.9, steps=2)
    scores = canary_scores(x, score="steps", sample_rate=0.5, noise_multiplier=1.146)
    result = analyse(scores, truth, claim, observations=x, claimed_epsilon=4.0)
    assert result.checks["noise"]["rejects_claim"] and result.verdict == "FAIL"  # 10% less noise
    assert not result.fdp["rejects_claim"] and result.epsilon_lower_bound < 4.0  # the bounds cannot see it
    levels = result.plan["levels"]
    assert sum(levels.values()) + levels["check"] == pytest.approx(0.05) and levels["check"] == pytest.approx(0.0005)
    assert result.checks["noise"]["level"] == levels["check"] and result.fdp["level"] == levels["fdp"]
    assert analyse(scores, truth, claim).checks == {}  # no observations (black-box): no checks


# The bug suite's claim (ε = 4: σ = 1.146, q = 0.5, T = 2) with σ given (no calibration), 1,000 canaries.
SMALL = dict(mode="white", model="linear", canaries=1000, k=500, batch_size=250, epochs=1, lr=0.1, delta=1e-5,
             sigma=1.146, accountant="pld", seed=0)


@pytest.fixture(scope="module")
def small_runs(mnist_root):
    root = str(mnist_root)
    return {bug: run_audit(AuditConfig(**SMALL, data_root=root), tamper=None if bug == "none" else _tamper(bug))
            for bug in ("none", "noise_half", "clipping_2c")}


def test_real_engine_observations_are_the_claimed_mechanism(small_runs):
    """The fast engine's real updates, read back by the instrument: spread σ and one clipped canary a sampled
    step, so a correct run passes both checks; the printed line names both."""
    result = small_runs["none"]
    noise, clipping = result["checks"]["noise"], result["checks"]["clipping"]
    assert noise["values"] == 2 * (1000 - result["canaries_included"]) and abs(noise["spread_ratio"] - 1) < 0.06
    assert abs(clipping["contribution_ratio"] - 1) < 0.15 and not clipping["rejects_claim"]
    assert result["verdict"] == "PASS"
    line = [text for text in summary_lines(result, "x") if "mechanism checks" in text]
    assert len(line) == 1 and "level 0.0005 each" in line[0] and line[0].count(": passes") == 2
    assert "REJECTED" not in line[0]


@pytest.mark.parametrize("bug,check", [("noise_half", "noise"), ("clipping_2c", "clipping")])
def test_real_engine_bugs_are_flagged_by_the_checks(small_runs, bug, check):
    """1,000 canaries already flag half the noise and clipping at 2C by many orders of magnitude."""
    result = small_runs[bug]
    assert result["verdict"] == "FAIL" and result["checks"][check]["rejects_claim"]
    assert result["checks"][check]["p_value"] < 1e-10
    line = next(text for text in summary_lines(result, "x") if "mechanism checks" in text)
    assert line.count("REJECTED") == 1 and line.count(": passes") == 1

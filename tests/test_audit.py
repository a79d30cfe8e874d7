"""The one-run audit: its two analyses, the white-box run, and the command line (real MNIST, CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpvision.audit import AuditConfig, analyse, audit_scores, epsilon_lower_bound, p_value, run_audit
from dpvision.audit.fdp import dpsgd_epsilon, dpsgd_tradeoff, fdp_lower_bound, fdp_rejects
from dpvision.audit.stats import default_guess_grid
from dpvision.cli import main


def test_p_value_without_delta_is_the_binomial_tail():
    # All r guesses right: P[Bin(r, p) >= r] = p^r.
    p = 1 / (1 + math.exp(-2.0))
    assert p_value(m=1000, r=50, v=50, epsilon=2.0, delta=0.0) == pytest.approx(p**50, rel=1e-10)
    assert p_value(m=1000, r=50, v=0, epsilon=2.0, delta=0.0) == 1.0


def test_delta_term_only_weakens_the_bound():
    tight = epsilon_lower_bound(m=1000, r=100, v=95, delta=0.0, beta=0.05)
    loose = epsilon_lower_bound(m=1000, r=100, v=95, delta=1e-5, beta=0.05)
    assert 0 < loose < tight
    assert p_value(m=1000, r=100, v=95, epsilon=1.0, delta=1e-5) > p_value(m=1000, r=100, v=95, epsilon=1.0, delta=0)


def test_lower_bound_closed_form_when_all_correct():
    # δ = 0, v = r: the bound is logit(β^(1/r)).
    beta, r = 0.05, 200
    p = beta ** (1 / r)
    assert epsilon_lower_bound(m=1000, r=r, v=r, delta=0.0, beta=beta) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_bonferroni_over_the_grid():
    grid = default_guess_grid(1000)
    assert len(grid) == 14 and (1000, 0) in grid and (5, 5) in grid
    rng = np.random.default_rng(1)
    truth = rng.random(1000) < 0.5
    perfect = audit_scores(truth.astype(float), truth, delta=0.0)
    single = audit_scores(truth.astype(float), truth, delta=0.0, grid=[(perfect.k_plus, perfect.k_minus)])
    assert perfect.pairs_tried == 14 and single.epsilon_lower_bound > perfect.epsilon_lower_bound


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_randomised_response_is_never_overestimated(epsilon):
    """Scores from an exactly ε-DP mechanism (randomised response): the bound stays below ε."""
    rng = np.random.default_rng(7)
    exceed = 0
    for _ in range(40):
        truth = rng.random(1000) < 0.5
        keep = rng.random(1000) < math.exp(epsilon) / (1 + math.exp(epsilon))
        response = np.where(keep, truth, ~truth)
        scores = response + rng.random(1000) * 1e-3  # ties broken at random
        exceed += audit_scores(scores, truth, delta=1e-5).epsilon_lower_bound > epsilon
    assert exceed <= 2  # 95% confidence: at most ~5% of the runs may exceed; none expected


# ----------------------------------------------------------------------------------------- f-DP analysis
def test_fdp_rejection_is_monotone_in_correct_guesses_and_in_the_claim():
    curve = dpsgd_tradeoff(noise_multiplier=1.0, sample_rate=1.0, steps=1)  # the Gaussian mechanism, μ = 1
    rejected = [fdp_rejects(curve, m=1000, guesses=100, correct=c, beta=0.05) for c in range(50, 101)]
    assert rejected == sorted(rejected) and rejected[-1] and not rejected[0]  # more correct: rejected sooner
    weaker = dpsgd_tradeoff(noise_multiplier=0.5, sample_rate=1.0, steps=1)  # a less private claim
    first = rejected.index(True) + 50
    assert not fdp_rejects(weaker, m=1000, guesses=100, correct=first, beta=0.05)


def test_fdp_bound_is_monotone_in_guesses():
    bounds = [fdp_lower_bound([(100, 0, c)], m=1000, sample_rate=0.1, steps=40, delta=1e-5, beta=0.05)
              .epsilon_lower_bound for c in (70, 85, 95, 100)]
    assert bounds == sorted(bounds) and bounds[0] < bounds[-1]


def _simulated_dpsgd_scores(rng, *, m: int, sigma: float, q: float, steps: int):
    """The canaries' exact Neyman-Pearson scores in the worst case DP-SGD's accountant covers."""
    truth = rng.random(m) < 0.5
    x = ((rng.random((steps, m)) < q) & truth) + sigma * rng.standard_normal((steps, m))  # [T, m]
    z = (x - 0.5) / sigma**2
    return np.logaddexp(math.log1p(-q), z + math.log(q)).sum(0), truth


@pytest.mark.slow
@pytest.mark.parametrize("sigma", [0.8, 1.5])
def test_bounds_never_exceed_the_true_epsilon_of_simulated_dpsgd(sigma):
    """A mechanism with known ε (DP-SGD in its worst case, exact scores): over 20 seeds, at 95% confidence,
    neither bound exceeds the true (PLD) ε, and the f-DP bound is at least Steinke et al.'s."""
    q, steps, delta = 0.1, 40, 1e-5
    true_eps = dpsgd_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    rng = np.random.default_rng(3)
    exceed, tighter = 0, 0
    for _ in range(20):
        scores, truth = _simulated_dpsgd_scores(rng, m=1000, sigma=sigma, q=q, steps=steps)
        result = analyse(scores, truth, delta=delta, sample_rate=q, noise_multiplier=sigma, steps=steps)
        exceed += result.epsilon_lower_bound > true_eps or result.verdict == "FAIL"
        tighter += result.fdp["epsilon_lower_bound"] >= result.steinke["epsilon_lower_bound"]
        assert result.epsilon_lower_bound > 0.1 * true_eps  # the attack is not empty
    assert exceed <= 1 and tighter >= 18


def test_simulated_dpsgd_with_half_the_noise_fails():
    q, steps, sigma = 0.1, 40, 1.5
    rng = np.random.default_rng(4)
    scores, truth = _simulated_dpsgd_scores(rng, m=1000, sigma=sigma / 4, q=q, steps=steps)
    result = analyse(scores, truth, delta=1e-5, sample_rate=q, noise_multiplier=sigma, steps=steps)
    assert result.verdict == "FAIL" and result.epsilon_lower_bound > result.claimed_epsilon_pld


# ----------------------------------------------------------------------------------------- runs on MNIST
TINY = dict(mode="white", model="linear", canaries=1000, k=500, batch_size=50, epochs=4, lr=0.1, delta=1e-5)


@pytest.fixture(scope="module")
def white_runs(mnist_root):
    root = str(mnist_root)
    return {
        "nodp": run_audit(AuditConfig(**TINY, disable_dp=True, data_root=root)),
        "dp": run_audit(AuditConfig(**TINY, epsilon=2.0, data_root=root)),
    }


def test_white_box_non_private_run_scores_far_above_dp_run(white_runs):
    nodp, dp = white_runs["nodp"], white_runs["dp"]
    assert nodp["epsilon"] == math.inf and nodp["verdict"] == "PASS"
    assert nodp["epsilon_lower_bound"] > 4.0
    assert nodp["epsilon_lower_bound"] > dp["epsilon_lower_bound"] + 2.0


def test_white_box_dp_run_passes_below_its_epsilon(white_runs):
    dp = white_runs["dp"]
    assert dp["epsilon"] == pytest.approx(2.0, rel=0.01) and dp["epsilon"] <= 2.0
    assert dp["epsilon_lower_bound"] <= dp["epsilon"] and dp["verdict"] == "PASS"
    # Dirac canaries in untouched coordinates: 0.19-0.57 over seeds 0-4 at this size (one run varies a lot).
    assert dp["epsilon_lower_bound"] > 0.15
    assert dp["steps"] == 40 and dp["canaries"] == 1000 and 400 < dp["canaries_included"] < 600
    assert set(dp["epsilons"]) == {"rdp", "prv", "pld"} and dp["threat_model"] == "white-box, all iterates"
    # Every included canary was sampled about q T = 4 times, never an excluded one.
    assert dp["canary_inclusions"] == pytest.approx(4 * dp["canaries_included"], rel=0.15)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_correct_runs_pass_over_seeds(seed, mnist_root):
    """With seed 0 (tests/test_audit_bugs.py), five seeds of the correct CI-size run at claimed ε = 4 pass."""
    result = run_audit(AuditConfig(**TINY, epsilon=4.0, seed=seed, data_root=str(mnist_root)))
    assert result["verdict"] == "PASS" and result["epsilon_lower_bound"] <= result["epsilon_claimed_curve_pld"]
    assert result["epsilon_lower_bound"] > 0.5


def test_last_iterate_is_weaker_than_all_iterates(white_runs, mnist_root):
    last = run_audit(AuditConfig(**TINY, epsilon=2.0, score="final", data_root=str(mnist_root)))
    assert last["verdict"] == "PASS" and last["threat_model"] == "white-box, last iterate"
    assert last["epsilon_lower_bound"] <= white_runs["dp"]["epsilon_lower_bound"]


def test_black_box_dp_run_is_at_or_below_its_epsilon(mnist_root):
    result = run_audit(AuditConfig(**{**TINY, "mode": "black", "canaries": 200}, epsilon=2.0,
                                   data_root=str(mnist_root)))
    assert result["verdict"] == "PASS" and result["epsilon_lower_bound"] <= result["epsilon"]
    assert result["training_examples"] == 500 + result["canaries_included"]


CLI_TINY = ["audit", "--model", "linear", "--k", "500", "--batch-size", "50", "--epochs", "4", "--lr", "0.1",
            "--canaries", "1000", "--quiet"]


def test_cli_two_audits_make_two_folders_with_pass_lines(tmp_path, mnist_root, capsys):
    args = CLI_TINY + ["--epsilon", "4", "--data-root", str(mnist_root), "--runs-dir", str(tmp_path)]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out
    folders = sorted(p.name for p in (tmp_path / "audit").iterdir())
    assert folders == ["white-steps-eps4-seed0", "white-steps-eps4-seed0-2"]
    for out, folder in zip((first, second), folders):
        assert out.startswith("PASS: audit (white-box, all iterates, m=1000 canaries")
        assert f"Outputs: {tmp_path / 'audit' / folder}/ (audit.json)" in out
        assert "rdp" in out and "prv" in out and "pld" in out and "does not prove" in out
        data = json.loads((tmp_path / "audit" / folder / "audit.json").read_text())
        assert data["verdict"] == "PASS" and data["epsilon_lower_bound"] <= data["epsilon"]
        assert data["epsilon_lower_bound"] == max(data["steinke"]["epsilon_lower_bound"],
                                                  data["fdp"]["epsilon_lower_bound"])


def test_cli_bad_input_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--epsilon", "1", "--sigma", "1"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_cli_has_no_bug_switches():
    """Broken training exists only in the test harness (tests/test_audit_bugs.py), never as a flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--epsilon", "1", "--noise-scale-for-testing", "0.5"])
    assert exit_info.value.code == 2


def test_fdp_matches_jax_privacy_published_example():
    """jax_privacy 2.0's auditing tests: in-scores N(1, 1), out-scores N(0, 1) at 10,000 deterministic quantiles
    each, δ = 1e-6, 95% confidence: the f-DP one-run bound (Gaussian curves) is 2.164749. Their Bonferroni
    correction counts the 386 vertices of the ROC's upper hull; with the same count and the same curves (DP-SGD
    at q = 1, T = 1 is the Gaussian mechanism) this implementation gives the same bound."""
    from scipy import stats

    n = 10_000
    quantiles = stats.norm.ppf((np.arange(n) + 0.5) / n)
    scores = np.concatenate([quantiles + 1.0, quantiles])
    truth = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    ranked = truth[np.argsort(-scores, kind="stable")]
    counts = [(k, 0, int(ranked[:k].sum())) for k in range(300, 421, 2)]  # around their best threshold
    bound = fdp_lower_bound(counts, m=2 * n, sample_rate=1.0, steps=1, delta=1e-6, beta=0.05 / 386)
    assert bound.epsilon_lower_bound == pytest.approx(2.164749, abs=0.01)

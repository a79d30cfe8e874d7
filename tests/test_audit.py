"""The one-run audit: its two analyses, the white-box run, and the command line (real MNIST, CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpvision.audit import AuditConfig, analyse, audit_scores, epsilon_lower_bound, p_value, run_audit
from dpvision.audit.analysis import Claim
from dpvision.audit.design import canary_scores, guess_counts, plan_guesses, simulate_observations
from dpvision.audit.fdp import dpsgd_epsilon, dpsgd_out_epsilon, dpsgd_tradeoff, fdp_lower_bound, fdp_rejects
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


def test_full_batch_closed_forms_match_the_pld_and_the_simulation():
    """q = 1: the exact Gaussian ε agrees with the PLD accountant's; the f-DP curves' envelope gives the same
    inverse blow-up as the max over every supporting line; the plan's closed-form counts match simulated runs."""
    from dpvision.audit.design import expected_counts
    from dpvision.audit.fdp import _pld

    for sigma, steps in ((3.42, 10), (10.93, 30), (1.0, 1)):
        exact = dpsgd_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=1e-5)
        assert exact == pytest.approx(float(_pld(sigma, 1.0, steps).get_epsilon_for_delta(1e-5)), abs=1e-3)
    for curve in (dpsgd_tradeoff(noise_multiplier=3.42, sample_rate=1.0, steps=10),
                  dpsgd_tradeoff(noise_multiplier=1.146, sample_rate=0.5, steps=2)):
        for x in np.r_[np.linspace(0, 1, 201), np.geomspace(1e-9, 1e-2, 50)]:
            brute = max(0.0, float(np.max((x - curve.deltas) * np.exp(-curve.epsilons))))
            assert curve.inverse_blow_up(x) == pytest.approx(brute, rel=1e-12, abs=1e-300)
    pairs = [(245, 245), (0, 490), (1000, 0)]
    closed = expected_counts(m=20_000, sample_rate=1.0, noise_multiplier=3.42, steps=10, score="steps", pairs=pairs)
    rng = np.random.default_rng(0)
    simulated = np.array([[c for *_, c in guess_counts(*_simulated_run(rng, FULL_BATCH, m=20_000), pairs)]
                          for _ in range(20)])  # [runs, pairs]
    error = np.array([c for *_, c in closed]) - simulated.mean(0)
    assert np.all(np.abs(error) <= 4 * simulated.std(0) / np.sqrt(20) + 1), error  # + 1: the plan truncates


def _simulated_run(rng, claim: Claim, *, m: int, noise_scale: float = 1.0, sample_scale: float = 1.0):
    """Scores of DP-SGD's worst case (Dirac canaries), exactly as the white-box audit scores them."""
    x, truth = simulate_observations(rng, m=m, sample_rate=min(1.0, claim.sample_rate * sample_scale),
                                     steps=claim.steps, noise_multiplier=claim.noise_multiplier * noise_scale)
    return canary_scores(x, score="steps", sample_rate=claim.sample_rate,
                         noise_multiplier=claim.noise_multiplier), truth


FULL_BATCH = Claim(noise_multiplier=3.42, sample_rate=1.0, steps=10, delta=1e-5)  # ε = 4.0 (PLD)
HALF_BATCH = Claim(noise_multiplier=1.146, sample_rate=0.5, steps=2, delta=1e-5)  # ε = 4.0 (PLD)


def test_scores_are_the_likelihood_ratio_of_the_claim():
    x = np.array([[1.5, -0.2, 0.3], [0.1, 0.4, -1.0]])  # [T = 2, m = 3]
    full = canary_scores(x, score="steps", sample_rate=1.0, noise_multiplier=2.0)
    assert full == pytest.approx((x.sum(0) - 1.0) / 4.0)  # q = 1: the sum, shifted and scaled
    half = canary_scores(x, score="steps", sample_rate=0.5, noise_multiplier=2.0)
    assert half == pytest.approx(np.log(0.5 + 0.5 * np.exp((x - 0.5) / 4.0)).sum(0))
    assert canary_scores(x, score="final", sample_rate=0.5, noise_multiplier=2.0) == pytest.approx(x.sum(0))
    with pytest.raises(ValueError, match="score"):
        canary_scores(x, score="max", sample_rate=0.5, noise_multiplier=2.0)


def test_out_direction_epsilon_is_capped_by_poisson_sampling():
    floor = -2 * math.log(0.5)  # T log(1 / (1 - q)): an included canary is never sampled w.p. (1 - q)^T
    assert dpsgd_out_epsilon(noise_multiplier=0.0, sample_rate=0.5, steps=2, delta=1e-6) == pytest.approx(floor)
    noisy = [dpsgd_out_epsilon(noise_multiplier=1.146, sample_rate=0.5, steps=2, delta=d) for d in (1e-4, 1e-6)]
    assert noisy[0] < noisy[1] < floor  # noise helps; a smaller δ costs ε; never above the floor
    full = dpsgd_out_epsilon(noise_multiplier=1.146, sample_rate=1.0, steps=2, delta=1e-6)  # no sampling: symmetric
    assert full == pytest.approx(dpsgd_epsilon(noise_multiplier=1.146, sample_rate=1.0, steps=2, delta=1e-6))


def test_sampling_check_holds_for_poisson_and_catches_a_doubled_rate():
    rng = np.random.default_rng(5)
    rejected = 0
    for _ in range(10):  # correct Poisson sampling: the "out" guesses stay within the claim
        rejected += analyse(*_simulated_run(rng, HALF_BATCH, m=6000), HALF_BATCH).sampling["rejects_claim"]
    assert rejected <= 1
    sampling = analyse(*_simulated_run(rng, HALF_BATCH, m=6000, sample_scale=2.0), HALF_BATCH).sampling
    assert sampling["rejects_claim"] and sampling["k_minus"] == 120  # 2% of m, fixed in advance
    assert sampling["correct"] > sampling["ceiling"] * sampling["k_minus"]  # the accountant told q / 2


def test_guess_plan_depends_on_the_claim_only():
    levels = FULL_BATCH.levels(0.95)
    plan = plan_guesses(m=4000, sample_rate=1.0, noise_multiplier=3.42, steps=10, score="steps", delta=1e-5,
                        steinke_level=levels.steinke, fdp_level=levels.fdp)
    assert plan == plan_guesses(m=4000, sample_rate=1.0, noise_multiplier=3.42, steps=10, score="steps",
                                delta=1e-5, steinke_level=levels.steinke, fdp_level=levels.fdp)
    assert plan.sampling == 0 and 0 < plan.expected_steinke <= plan.expected_fdp < 4.0
    rng = np.random.default_rng(0)
    first = analyse(*_simulated_run(rng, FULL_BATCH, m=4000), FULL_BATCH)
    second = analyse(*_simulated_run(rng, FULL_BATCH, m=4000), FULL_BATCH)
    assert first.plan == second.plan and first.fdp["guesses"] == sum(plan.fdp)
    # Without observations: Steinke 1 : f-DP 3 (: sampling 2 when q < 1) of the whole 5%.
    assert (levels.steinke, levels.fdp, levels.sampling, levels.check) == pytest.approx((0.0125, 0.0375, 0, 0))
    half = HALF_BATCH.levels(0.95)
    assert (half.steinke, half.fdp, half.sampling) == pytest.approx((0.05 / 6, 0.05 / 2, 0.05 / 3))
    # With the two mechanism checks (white-box observations): 0.05 / 100 each, the analyses share the rest.
    checked = HALF_BATCH.levels(0.95, checks=True)
    assert checked.check == pytest.approx(0.0005) and checked.fdp == pytest.approx(0.049 / 2)
    assert checked.total() == pytest.approx(0.05) and levels.total() == pytest.approx(0.05)


def test_full_batch_audit_is_tight_and_never_above_the_claim():
    """q = 1: each canary's view is the Gaussian mechanism (μ = √T / σ = 0.925). Over 10 simulated runs of
    20,000 canaries, the bound is at least 0.55 ε on average and never above the claimed ε = 4."""
    rng = np.random.default_rng(11)
    bounds = []
    for _ in range(10):
        result = analyse(*_simulated_run(rng, FULL_BATCH, m=20_000), FULL_BATCH, claimed_epsilon=4.0)
        assert result.verdict == "PASS" and result.epsilon_lower_bound <= 4.0
        bounds.append(result.epsilon_lower_bound)
    assert np.mean(bounds) >= 0.55 * 4.0 and min(bounds) > 0.4 * 4.0


@pytest.mark.parametrize("noise_scale", [0.0, 0.5])
def test_simulated_runs_with_too_little_noise_fail(noise_scale):
    """At claimed ε = 4, half the noise needs ~10,000 canaries to be certain (4,000 miss it at q = 0.5)."""
    rng = np.random.default_rng(4)
    for claim in (FULL_BATCH, HALF_BATCH):
        result = analyse(*_simulated_run(rng, claim, m=10_000, noise_scale=noise_scale), claim, claimed_epsilon=4.0)
        assert result.verdict == "FAIL" and result.fdp["rejects_claim"], claim


def test_analyse_rejects_bad_input():
    with pytest.raises(ValueError, match="scores and included"):
        analyse(np.zeros(3), np.zeros(4, bool), FULL_BATCH)
    with pytest.raises(ValueError, match="finite"):
        analyse(np.array([0.0, np.nan]), np.array([True, False]), FULL_BATCH)
    with pytest.raises(ValueError, match="observations must be"):
        analyse(np.zeros(3), np.zeros(3, bool), FULL_BATCH, observations=np.zeros((2, 4)))


# ----------------------------------------------------------------------------------------- runs on MNIST
TINY = dict(mode="white", model="linear", canaries=2000, k=500, batch_size=500, epochs=4, lr=0.1, delta=1e-5)
# q = 1 (full batch), T = 4: each canary's view is the Gaussian mechanism; m = 2,000 keeps it CI-sized.


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
    assert dp["epsilon"] == pytest.approx(2.0, rel=0.01) and dp["epsilon"] <= 2.0 and dp["accountant"] == "pld"
    assert dp["epsilon_lower_bound"] <= dp["epsilon"] and dp["verdict"] == "PASS"
    assert dp["epsilon_lower_bound"] > 0.5  # 2,000 canaries; the tightness numbers need 20,000 (docs/privacy.md)
    assert dp["steps"] == 4 and dp["sample_rate"] == 1.0 and 900 < dp["canaries_included"] < 1100
    assert set(dp["epsilons"]) == {"rdp", "prv", "pld"} and dp["threat_model"] == "white-box, all iterates"
    assert dp["canary_inclusions"] == 4 * dp["canaries_included"]  # q = 1: every included canary, every step
    assert dp["sampling"]["k_minus"] == 0 and dp["plan"]["fdp"] == [dp["fdp"]["k_plus"], dp["fdp"]["k_minus"]]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_correct_runs_stay_below_the_claim_over_seeds(seed, mnist_root):
    """Five seeds of a correct full-batch run at claimed ε = 4: PASS, the bound at most the claimed ε."""
    result = run_audit(AuditConfig(**{**TINY, "canaries": 6000}, epsilon=4.0, seed=seed, data_root=str(mnist_root)))
    assert result["verdict"] == "PASS" and result["epsilon_lower_bound"] <= result["epsilon_claimed_curve_pld"]
    assert result["epsilon_lower_bound"] > 1.2


def test_last_iterate_loses_nothing_at_full_batch(white_runs, mnist_root):
    """At q = 1 the sum of the updates is sufficient: the last iterate gives the all-iterates bound."""
    last = run_audit(AuditConfig(**TINY, epsilon=2.0, score="final", data_root=str(mnist_root)))
    assert last["verdict"] == "PASS" and last["threat_model"] == "white-box, last iterate"
    assert last["epsilon_lower_bound"] == pytest.approx(white_runs["dp"]["epsilon_lower_bound"], abs=1e-6)


def test_black_box_dp_run_is_at_or_below_its_epsilon(mnist_root):
    # σ given (ε = 2.1 at the q = 0.5, T = 8 the black-box canaries make): no calibration at q < 1, ~25 s less
    result = run_audit(AuditConfig(**{**TINY, "mode": "black", "canaries": 200}, sigma=3.0,
                                   data_root=str(mnist_root)))
    assert result["verdict"] == "PASS" and result["epsilon_lower_bound"] <= result["epsilon"]
    assert result["training_examples"] == 500 + result["canaries_included"]


CLI_TINY = ["audit", "--model", "linear", "--k", "500", "--batch-size", "500", "--epochs", "4", "--lr", "0.1",
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


def test_default_run_is_full_batch_and_bad_batch_names_its_flag():
    config = AuditConfig(k=500, epsilon=2.0)
    assert config.batch_size == 500 and config.accountant == "pld" and config.canaries == 20_000
    with pytest.raises(ValueError, match="--batch-size must be between 1 and --k"):
        AuditConfig(k=500, batch_size=501, epsilon=2.0)


@pytest.mark.slow
def test_cost_comparison_times_the_audit_and_the_run_it_audits(mnist_root, capsys):
    """``python -m dpvision.audit.cost``: the same run without canaries takes as many steps; both times print."""
    from dpvision.audit.cost import main as cost_main

    assert cost_main(["--model", "linear", "--k", "500", "--epochs", "3", "--canaries", "1000", "--epsilon", "4",
                      "--quiet", "--data-root", str(mnist_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("warm-up training run (cold, not in the ratio): ")  # one-time costs fall here
    assert lines[1].startswith("training run alone: ") and "(3 steps, linear, k = 500, batch 500, cpu)" in lines[1]
    assert lines[2].startswith("audit of that run: ") and "(target: at most 2x; both after" in lines[2]
    assert lines[3].startswith("PASS: audit (white-box, all iterates, m=1000 canaries")
    with pytest.raises(SystemExit) as exit_info:
        cost_main(["--mode", "black", "--epsilon", "4"])
    assert exit_info.value.code == 2

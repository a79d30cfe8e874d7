"""The one-run audit: its statistics, and runs that it must pass or catch (tiny, real MNIST, CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from dpvision.audit import AuditConfig, audit_scores, epsilon_lower_bound, p_value, run_audit
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


TINY = dict(mode="white", model="linear", canaries=1000, k=500, batch_size=50, epochs=4, lr=0.1, delta=1e-5)


@pytest.fixture(scope="module")
def white_runs(mnist_root):
    root = str(mnist_root)
    return {
        "nodp": run_audit(AuditConfig(**TINY, disable_dp=True, data_root=root)),
        "dp": run_audit(AuditConfig(**TINY, epsilon=2.0, data_root=root)),
        "broken": run_audit(AuditConfig(**TINY, epsilon=1.0, noise_scale_for_testing=0.01, data_root=root)),
    }


def test_white_box_non_private_run_scores_far_above_dp_run(white_runs):
    nodp, dp = white_runs["nodp"], white_runs["dp"]
    assert nodp["epsilon"] == math.inf and nodp["consistent"]
    assert nodp["epsilon_lower_bound"] > 3.0
    assert nodp["epsilon_lower_bound"] > dp["epsilon_lower_bound"] + 2.0


def test_white_box_dp_run_is_at_or_below_its_epsilon(white_runs):
    dp = white_runs["dp"]
    assert dp["epsilon"] == pytest.approx(2.0, rel=0.01) and dp["epsilon"] <= 2.0
    assert dp["epsilon_lower_bound"] <= dp["epsilon"] and dp["consistent"]
    assert dp["steps"] == 40 and dp["canaries"] == 1000 and 400 < dp["canaries_included"] < 600


def test_white_box_catches_a_broken_run(white_runs):
    broken = white_runs["broken"]
    assert broken["epsilon"] == pytest.approx(1.0, rel=0.01)
    assert broken["epsilon_lower_bound"] > broken["epsilon"] + 0.5
    assert not broken["consistent"] and "VIOLATION" in broken["verdict"]


def test_black_box_dp_run_is_at_or_below_its_epsilon(mnist_root):
    result = run_audit(AuditConfig(**{**TINY, "mode": "black", "canaries": 200}, epsilon=2.0,
                                   data_root=str(mnist_root)))
    assert result["consistent"] and result["epsilon_lower_bound"] <= result["epsilon"]
    assert result["training_examples"] == 500 + result["canaries_included"]


def test_cli_writes_json_and_exits_1_on_violation(tmp_path, mnist_root, capsys):
    out = tmp_path / "audit.json"
    code = main(["audit", "--model", "linear", "--k", "500", "--batch-size", "50", "--epochs", "4", "--lr", "0.1",
                 "--epsilon", "1", "--noise-scale-for-testing", "0.01", "--data-root", str(mnist_root),
                 "--out", str(out)])
    assert code == 1
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "VIOLATION" in line
    data = json.loads(out.read_text())
    assert data["epsilon_lower_bound"] > data["epsilon"] and len(data["guess_table"]) == 14


def test_cli_bad_input_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "--epsilon", "1", "--sigma", "1"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1

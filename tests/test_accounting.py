"""ε from each accountant against library/published values; calibration; --delta auto; memoisation."""

from __future__ import annotations

import math
import time

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from dpvision.cli import OneLineParser, add_mnist_arguments, mnist_config_from_args
from dpvision.mnist import MnistConfig
from dpvision.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    compute_epsilons,
    resolve_delta,
)
from dpvision.jobs.loop import EPSILON_COLUMNS, epsilon_columns

REFERENCE = [(1.5, 0.04, 2250)]  # σ, q, steps of Opacus's accountant tests (δ = 1e-5)


def test_rdp_matches_opacus_published_value():
    assert compute_epsilon(REFERENCE, delta=1e-5, accountant="rdp") == pytest.approx(7.32911117143, abs=1e-8)


def test_prv_matches_opacus_published_value():
    assert compute_epsilon(REFERENCE, delta=1e-5, accountant="prv") == pytest.approx(6.7774, abs=0.01)


def test_pld_close_to_prv_and_all_ordered():
    eps = compute_epsilons(REFERENCE, delta=1e-5)
    assert set(eps) == set(ACCOUNTANTS)
    # PLD (dp_accounting, pessimistic) and PRV (Opacus) are both near-exact: within a few hundredths.
    assert 6.70 <= eps["pld"] <= 6.85
    assert abs(eps["pld"] - eps["prv"]) < 0.05
    # RDP's conversion to (ε, δ) is loose: it must be the largest of the three.
    assert eps["rdp"] > eps["prv"] + 0.3 and eps["rdp"] > eps["pld"] + 0.3


def test_default_mnist_run_values():
    """The default mnist.py run: σ = 1.3, q = 1/118, 3540 steps, δ = 1e-5."""
    eps = compute_epsilons([(1.3, 1 / 118, 3540)], delta=1e-5)
    reference = RDPAccountant()
    reference.history = [(1.3, 1 / 118, 3540)]
    assert eps["rdp"] == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-12)
    prv = PRVAccountant()
    prv.history = [(1.3, 1 / 118, 3540)]
    assert eps["prv"] == pytest.approx(prv.get_epsilon(delta=1e-5), abs=1e-9)
    assert eps["rdp"] == pytest.approx(2.0220, abs=1e-3)
    assert eps["prv"] == pytest.approx(1.858, abs=0.01) and eps["pld"] == pytest.approx(1.848, abs=0.01)


def test_segments_compose():
    split = compute_epsilon([(1.5, 0.04, 1000), (1.5, 0.04, 1250)], delta=1e-5, accountant="pld")
    assert split == pytest.approx(compute_epsilon(REFERENCE, delta=1e-5, accountant="pld"), rel=1e-3)
    assert compute_epsilon([], delta=1e-5, accountant="prv") == 0.0
    assert compute_epsilon([(0.0, 0.1, 10)], delta=1e-5, accountant="pld") == math.inf


@pytest.mark.parametrize("accountant", ACCOUNTANTS)
@pytest.mark.parametrize("target", [1.0, 3.0])
def test_calibration_round_trip_within_one_percent(accountant, target):
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=0.01, steps=1000,
                                       accountant=accountant)
    eps = compute_epsilon([(sigma, 0.01, 1000)], delta=1e-5, accountant=accountant)
    assert target * 0.99 <= eps <= target


def test_calibration_uses_the_chosen_accountant():
    rdp = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=1000, accountant="rdp")
    prv = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=1000, accountant="prv")
    assert prv < rdp  # the tighter accountant needs less noise for the same ε


def test_repeated_epsilon_is_memoised():
    history = [(1.1, 0.02, 3000)]
    compute_epsilon(history, delta=1e-5, accountant="pld")
    start = time.perf_counter()
    for _ in range(100):
        compute_epsilon(history, delta=1e-5, accountant="pld")
    assert time.perf_counter() - start < 0.05


def test_ledger_extended_merges_like_record():
    ledger = PrivacyLedger()
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    ext = ledger.extended(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    assert ext.history == [(1.0, 0.1, 8)] and ledger.history == [(1.0, 0.1, 5)]
    cols = epsilon_columns(ext, delta=1e-5)
    assert list(cols) == EPSILON_COLUMNS and cols["epsilon_rdp"] == ext.epsilon(delta=1e-5)
    assert all(v == math.inf for v in epsilon_columns(ext, delta=1e-5, dp=False).values())


def test_delta_auto():
    assert resolve_delta("auto", 30_000) == pytest.approx(1 / 300_000, rel=1e-15)
    assert resolve_delta(1e-5, 10) == 1e-5
    assert MnistConfig(k=1000, batch_size=100, delta="auto").delta == pytest.approx(1e-4, rel=1e-15)
    parser = OneLineParser(prog="mnist.py")
    add_mnist_arguments(parser)
    config = mnist_config_from_args(parser.parse_args(["--delta", "auto", "--k", "2000", "--batch-size", "100"]))
    assert config.delta == pytest.approx(1 / 20_000, rel=1e-15)


def test_delta_bad_value_is_one_line_exit_2(capsys):
    parser = OneLineParser(prog="mnist.py")
    add_mnist_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--delta", "sometimes"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--delta" in err and "auto" in err


def test_target_epsilon_flag_is_epsilon():
    parser = OneLineParser(prog="mnist.py")
    add_mnist_arguments(parser)
    config = mnist_config_from_args(parser.parse_args(["--target-epsilon", "2", "--accountant", "pld"]))
    assert config.epsilon == 2.0 and config.epsilon_is_target and config.accountant == "pld"
    with pytest.raises(ValueError, match="disagree"):
        mnist_config_from_args(parser.parse_args(["--target-epsilon", "2", "--epsilon", "3"]))

"""ε from each accountant against library/published values; calibration; --delta auto; memoisation;
the exact expected batch size; bounds on σ and on the accountants' work (issue 13)."""

from __future__ import annotations

import dataclasses

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from dp_accounting import dp_event, pld
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from dpvision.data.tensors import ImageTensors
from dpvision.engines import OptimizerSpec
from dpvision.jobs.loop import EPSILON_COLUMNS, epsilon_columns
from dpvision.privacy import accounting, bounds
from dpvision.privacy.accountants import ACCOUNTANT_REGISTRY
from dpvision.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    compute_epsilons,
    epsilon_notes,
    expected_batch_size,
    poisson_sample_rate,
)
from dpvision.privacy.bounds import (
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    AccountantWorkError,
    check_noise_multiplier,
    grid_points,
    min_noise_multiplier,
)
from dpvision.privacy.plan import resolve_delta
from dpvision.seeding import make_generator
from tests.engine_helpers import DP, fast_engine, opacus_engine

REFERENCE = [(1.5, 0.04, 2250)]  # σ, q, steps of Opacus's accountant tests (δ = 1e-5)
MNIST_DEFAULT = [(1.3, 1 / 118, 3540)]  # mnist.py's default run: k = 30000, B = 256, 30 epochs
HOSTILE_SIGMAS = [0.01, 0.03, 1e-5, 1e-300, 1e8, 1e308]  # issue 13: hangs, MemoryError, ZeroDivision, Overflow


# --- exact values ------------------------------------------------------------------------------------------


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


def test_default_mnist_run_equals_the_libraries_exactly():
    """σ = 1.3, q = 1/118, 3540 steps, δ = 1e-5: each accountant is its library's own number, bit for bit."""
    eps = compute_epsilons(MNIST_DEFAULT, delta=1e-5, primary="rdp")
    rdp = RDPAccountant()
    rdp.history = list(MNIST_DEFAULT)
    prv = PRVAccountant()
    prv.history = list(MNIST_DEFAULT)
    reference_pld = pld.PLDAccountant()
    reference_pld.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(1 / 118, dp_event.GaussianDpEvent(1.3)), 3540))
    assert eps["rdp"] == rdp.get_epsilon(delta=1e-5)
    assert eps["prv"] == prv.get_epsilon(delta=1e-5)  # Opacus's defaults, which dpvision passes explicitly
    assert eps["pld"] == reference_pld.get_epsilon(1e-5)
    assert round(eps["rdp"], 9) == 2.021951063
    assert round(eps["prv"], 6) == 1.857894 and round(eps["pld"], 6) == 1.847801
    assert epsilon_notes(MNIST_DEFAULT, delta=1e-5) == {}


def test_full_batch_prv_is_opacus_number_without_numpy_warnings():
    """q = 1 (every example every step): Opacus's PRV takes log(1 - q) = -inf; dpvision returns its number and
    lets no "divide by zero" warning through."""
    import warnings

    history = [(1.0, 1.0, 10)]
    reference = PRVAccountant()
    reference.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference.get_epsilon(delta=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = compute_epsilon(history, delta=1e-5, accountant="prv")
    assert got == expected and 0 < got < compute_epsilon(history, delta=1e-5, accountant="rdp")


def test_segments_compose():
    split = compute_epsilon([(1.5, 0.04, 1000), (1.5, 0.04, 1250)], delta=1e-5, accountant="pld")
    assert split == pytest.approx(compute_epsilon(REFERENCE, delta=1e-5, accountant="pld"), rel=1e-3)
    assert compute_epsilon([], delta=1e-5, accountant="prv") == 0.0
    assert compute_epsilon([(0.0, 0.1, 10)], delta=1e-5, accountant="pld") == math.inf


# --- expected batch size (issue 13, item 1) --------------------------------------------------------------


def test_expected_batch_size_is_the_exact_floor():
    """E[B] = N // ceil(N/B) exactly; Opacus's int(N * q) is one less exactly where ceil(N/B) divides N and
    the float product falls below the integer (N = 49, B = 1: 0), and equal everywhere else."""
    off_by_one = []
    for n in range(1, 700):
        for b in range(1, n + 1):
            m = math.ceil(n / b)
            q = poisson_sample_rate(n, b)
            assert expected_batch_size(n, q) == n // m >= 1
            if int(n * q) != n // m:
                assert n % m == 0 and int(n * q) == n // m - 1, (n, b)
                off_by_one.append((n, b))
    assert (49, 1) in off_by_one and len(off_by_one) == 80  # of 244,650 pairs
    assert expected_batch_size(100, 0.3) == 30  # q not of the form 1/m: floored with a tolerance
    with pytest.raises(ValueError, match="below 1"):
        expected_batch_size(10, 0.03)


def tiny_data(n: int) -> ImageTensors:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 2, 2), dtype=torch.uint8, generator=gen)
    return ImageTensors(images, torch.randint(0, 2, (n,), generator=gen), (0.5,), (0.25,))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


# 49: Opacus's int(N * q) is 0 (NaN weights before the fix). 93: Opacus's loader has int(1/(1/93)) = 92
# steps, so make_private divided by int(93/92) and the engine's own q check failed (AssertionError).
@pytest.mark.parametrize("k", [49, 93])
def test_batch_size_one_gives_finite_weights_and_the_engines_agree(k):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    data, seed = tiny_data(k), 3
    settings = dict(train_data=data, batch_size=1, optimizer=OptimizerSpec(lr=0.5), seed=seed)
    off = DP(noise_multiplier=0.0, max_grad_norm=0.1)
    for noise in (DP(noise_multiplier=1.0, max_grad_norm=0.1), off):
        for make in (fast_engine, opacus_engine):
            engine = make(model=copy.deepcopy(model), dp=noise, **settings)
            engine.train_epoch()
            assert torch.isfinite(flat(engine.model)).all(), (engine.name, noise)
    # Noise off: the stock engine's real optimizer (make_private's, divisor fixed) replayed on the fast
    # engine's Poisson batches gives the fast engine's update.
    fast = fast_engine(model=copy.deepcopy(model), dp=off, **settings)
    result = fast.train_epoch()
    masks = torch.rand(result.steps, k, generator=make_generator(seed, "sampling")) < fast.sample_rate
    assert fast.last_batch_sizes == masks.sum(1).tolist()
    stock = opacus_engine(model=copy.deepcopy(model), dp=off, **settings)
    assert stock.optimizer.expected_batch_size == fast.plan.expected_batch_size == 1
    for mask in masks:
        idx = mask.nonzero()[:, 0]
        if len(idx):  # an empty batch adds nothing without noise (plain SGD)
            stock.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(stock._wrapped(data.normalize(data.images[idx])), data.labels[idx]).backward()
            stock.optimizer.step()
    update_fast, update_stock = flat(fast.model) - flat(model), flat(stock.model) - flat(model)
    assert update_stock.norm() > 0
    assert float((update_fast - update_stock).norm() / update_stock.norm()) < 1e-5


# --- bounds on σ (issue 13, item 2) ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1e-5, 1e-300, 1e8, 1e308, 0.0999, -1.0, math.nan, math.inf])
def test_sigma_out_of_range_is_refused_in_one_line(value):
    with pytest.raises(ValueError) as info:
        check_noise_multiplier(value)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--sigma must be 0 (no noise) or in [0.1, 10000]")


def test_sigma_in_range_and_zero_are_accepted():
    assert check_noise_multiplier(MIN_NOISE_MULTIPLIER) == 0.1 and check_noise_multiplier(MAX_NOISE_MULTIPLIER) == 1e4
    assert check_noise_multiplier(1.3, flag="dp.noise_multiplier", accountant="pld") == 1.3
    with pytest.warns(UserWarning, match="no noise"):
        assert check_noise_multiplier(0) == 0.0
    # RDP's work does not grow with the steps: never refused in range.
    assert check_noise_multiplier(0.1, accountant="rdp", sample_rate=0.5, steps=10**9, delta=1e-5) == 0.1


@pytest.mark.parametrize("sigma", HOSTILE_SIGMAS)
def test_hostile_sigmas_give_an_answer_and_a_reason(sigma):
    """Every metrics row and every resume asks for these: a value for each accountant, never a crash or hang."""
    ledger = PrivacyLedger()
    ledger.load_state_dict({"history": [[sigma, 1 / 118, 118]]})  # one epoch, as a resumed checkpoint has it
    eps, notes = ledger.epsilons(delta=1e-5, primary="rdp"), ledger.epsilon_notes(delta=1e-5)
    assert set(eps) == set(ACCOUNTANTS) and not any(math.isnan(v) for v in eps.values())
    if sigma < MIN_NOISE_MULTIPLIER:  # nothing computed: ∞ is the conservative answer
        assert all(v == math.inf for v in eps.values())
        assert all("below 0.1: not computed" in notes[name] for name in ACCOUNTANTS)
    else:  # counted as σ = 1e4, whose ε is at least the true one
        at_max = compute_epsilons([(MAX_NOISE_MULTIPLIER, 1 / 118, 118)], delta=1e-5)
        assert eps == at_max and all(0 < v < 0.2 for v in eps.values())
        assert all("counted as 10000" in notes[name] for name in ACCOUNTANTS)


def test_secondary_accountants_are_skipped_outside_the_safe_region():
    """σ = 0.3 is valid, but q = 1/2 over 3540 steps needs ~1e9 PRV grid points (and 77 s/4 GB-class PLD work):
    RDP answers, PRV and PLD say why they did not."""
    history = [(0.3, 0.5, 3540)]
    eps = compute_epsilons(history, delta=1e-5, primary="rdp")
    notes = epsilon_notes(history, delta=1e-5)
    assert math.isfinite(eps["rdp"]) and eps["rdp"] > 1000
    assert eps["prv"] == eps["pld"] == math.inf
    assert set(notes) == {"prv", "pld"}
    assert notes["prv"].startswith("prv not computed: its grid would have") and "limit 4e+06" in notes["prv"]
    assert notes["pld"].startswith("pld not computed")
    assert compute_epsilons(history, delta=1e-5)["prv"] == math.inf  # primary=None: the same bounds
    with pytest.raises(AccountantWorkError, match="use --accountant rdp"):
        compute_epsilons(history, delta=1e-5, primary="pld")  # as the primary it is never silently ∞
    with pytest.raises(AccountantWorkError):
        compute_epsilon(history, delta=1e-5, accountant="prv")


@pytest.fixture
def small_grid_limits(monkeypatch):
    """Grid limits far below the real ones, so the region's edge is cheap to evaluate (ε memo cleared)."""
    for name in ("prv", "pld"):
        monkeypatch.setitem(ACCOUNTANT_REGISTRY, name,
                            dataclasses.replace(ACCOUNTANT_REGISTRY[name], max_grid_points=200_000))
    monkeypatch.setattr(bounds, "PLD_MAX_SINGLE_STEP_POINTS", 20_000)
    accounting._evaluate.cache_clear()
    yield
    accounting._evaluate.cache_clear()


def test_pld_primary_refused_up_front_naming_the_sigma_it_needs(small_grid_limits):
    plan = dict(accountant="pld", sample_rate=1 / 118, steps=3540, delta=1e-5)
    with pytest.raises(AccountantWorkError) as info:
        check_noise_multiplier(0.2, **plan)
    message = str(info.value)
    assert "\n" not in message and message.startswith("--accountant pld needs --sigma >= ")
    assert message.endswith("use --accountant rdp")
    need = float(message.split(">= ")[1].split()[0])
    assert need == min_noise_multiplier("pld", sample_rate=1 / 118, steps=3541, delta=1e-5)
    assert check_noise_multiplier(need, **plan) == need  # the σ it names is accepted, a little less is not
    with pytest.raises(AccountantWorkError):
        check_noise_multiplier(need / 1.02, **plan)
    assert math.isfinite(compute_epsilon([(need, 1 / 118, 3540)], delta=1e-5, accountant="pld"))


def test_grid_prediction_grows_as_sigma_falls_and_steps_grow():
    def points(sigma, steps, accountant):
        return grid_points(((sigma, 0.01, steps),), delta=1e-5, accountant=accountant)

    for accountant in ("prv", "pld"):
        assert points(0.5, 1000, accountant) > points(1.0, 1000, accountant) > points(4.0, 1000, accountant)
        assert points(1.0, 100_000, accountant) > points(1.0, 1000, accountant)
    assert grid_points(((1.0, 0.01, 10**9),), delta=1e-5, accountant="rdp") == 0


# --- calibration within the bounds ----------------------------------------------------------------------


@pytest.mark.slow
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


def test_calibration_refuses_targets_outside_the_sigma_range():
    setting = dict(delta=1e-5, sample_rate=1 / 118, steps=3540)
    with pytest.raises(ValueError, match=r"needs sigma < 0\.1 .* sigma must be at least 0\.1"):
        calibrate_noise_multiplier(target_epsilon=1e5, **setting)  # before: σ ≈ 0.05, where PRV/PLD blow up
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(target_epsilon=0.01, **setting)  # RDP's ε never falls below ~0.1 here


def test_pld_calibration_never_leaves_the_safe_region(small_grid_limits):
    """Bisection starts at the smallest σ PLD can evaluate (before: it probed σ = 0.5, 0.25, ... from 0);
    an evaluation outside the region would raise AccountantWorkError, not return."""
    setting = dict(delta=1e-5, sample_rate=1 / 118, steps=3540)
    low = min_noise_multiplier("pld", **setting)
    target = compute_epsilon([(low * 1.2, 1 / 118, 3540)], delta=1e-5, accountant="pld")
    sigma = calibrate_noise_multiplier(target_epsilon=target, accountant="pld", rtol=0.01, **setting)
    assert low < sigma <= low * 1.2 * 1.01
    at_low = compute_epsilon([(low, 1 / 118, 3540)], delta=1e-5, accountant="pld")
    # a target the floor meets within the tolerance: the floor itself is the answer
    assert calibrate_noise_multiplier(target_epsilon=at_low * 1.0005, accountant="pld", **setting) >= low
    with pytest.raises(ValueError, match=r"the pld accountant needs sigma >= .*use --accountant rdp"):
        calibrate_noise_multiplier(target_epsilon=at_low * 1.5, accountant="pld", **setting)


# --- ledger, memoisation, δ ------------------------------------------------------------------------------


def test_repeated_epsilon_is_memoised():
    history = [(1.1, 0.02, 3000)]
    compute_epsilon(history, delta=1e-5, accountant="pld")
    hits = accounting._evaluate.cache_info().hits
    for _ in range(100):
        compute_epsilon(history, delta=1e-5, accountant="pld")
    assert accounting._evaluate.cache_info().hits == hits + 100


def test_ledger_extended_merges_like_record():
    ledger = PrivacyLedger()
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    ext = ledger.extended(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    assert ext.history == [(1.0, 0.1, 8)] and ledger.history == [(1.0, 0.1, 5)]
    cols = epsilon_columns(ext, delta=1e-5)
    assert list(cols) == EPSILON_COLUMNS and cols["epsilon_rdp"] == ext.epsilon(delta=1e-5)
    assert all(v == math.inf for v in epsilon_columns(ext, delta=1e-5, dp=False).values())


def test_invalid_ledger_segments_are_refused():
    for segment in [(-1.0, 0.1, 5), (math.nan, 0.1, 5), (1.0, 0.0, 5), (1.0, 1.5, 5), (1.0, 0.1, -1)]:
        with pytest.raises(ValueError, match="ledger segment"):
            compute_epsilon([segment], delta=1e-5)


def test_large_delta_gives_no_negative_epsilon():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert compute_epsilon([(10.0, 1.0, 1)], delta=0.5) == 0.0  # RDP's conversion alone would give -0.68


def test_delta_auto():
    assert resolve_delta("auto", 30_000) == pytest.approx(1 / 300_000, rel=1e-15)
    assert resolve_delta(1e-5, 10) == 1e-5
    assert resolve_delta("1e-4", 10) == 1e-4
    with pytest.raises(ValueError, match="dp.delta must be a number in"):
        resolve_delta("sometimes", 10)



@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.01, 1000), (1.3, 1 / 118, 3540), (2.0, 0.1, 50)])
def test_gdp_accountant_is_opacus_gaussian_accountant(sigma, q, steps):
    """The registered ``gdp`` is Opacus's GaussianAccountant (Poisson) exactly, split segments included."""
    from opacus.accountants import GaussianAccountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = GaussianAccountant()
    for _ in range(steps):
        direct.step(noise_multiplier=sigma, sample_rate=q)
    expected = direct.get_epsilon(delta=1e-5, poisson=True)
    assert compute_epsilon([(sigma, q, steps)], delta=1e-5, accountant="gdp") == expected
    assert compute_epsilon([(sigma, q, steps // 2), (sigma, q, steps - steps // 2)], delta=1e-5,
                           accountant="gdp") == pytest.approx(expected, rel=1e-12)


def test_gdp_is_never_a_default_nor_a_metrics_column():
    from dpvision.jobs.config import DPConfig
    from dpvision.privacy.accountants import ACCOUNTANT_REGISTRY

    assert ACCOUNTANTS == ("rdp", "prv", "pld") and "gdp" in ACCOUNTANT_REGISTRY
    assert not ACCOUNTANT_REGISTRY["gdp"].rigorous and "not an upper bound" in ACCOUNTANT_REGISTRY["gdp"].caveat
    assert DPConfig().accountant == "rdp" and DPConfig(accountant="gdp").accountant == "gdp"
    eps = compute_epsilons([(1.3, 1 / 118, 3540)], delta=1e-5, primary="gdp")
    assert set(eps) == {"rdp", "prv", "pld", "gdp"}  # the rigorous ones stay; the chosen one is added
    assert set(compute_epsilons([(1.3, 1 / 118, 3540)], delta=1e-5)) == set(ACCOUNTANTS)
    # σ calibrated to a gdp target reaches it under gdp
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=1000,
                                       accountant="gdp")
    assert 2.0 * (1 - 1e-3) <= compute_epsilon([(sigma, 0.01, 1000)], delta=1e-5, accountant="gdp") <= 2.0

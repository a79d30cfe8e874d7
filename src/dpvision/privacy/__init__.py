"""Privacy accounting: the accountant registry, the ledger of what was spent, ε from it, σ calibration and
budgets, bounds on σ, and the run's plan (δ resolved and checked once)."""

from dpvision.privacy.accountants import ACCOUNTANT_REGISTRY, ACCOUNTANTS, Accountant, register_accountant
from dpvision.privacy.accounting import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    check_accountant,
    compute_epsilon,
    compute_epsilons,
    epsilon_notes,
    expected_batch_size,
    poisson_sample_rate,
    steps_per_epoch,
)
from dpvision.privacy.bounds import (
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    AccountantWorkError,
    check_noise_multiplier,
)
from dpvision.privacy.budget import PrivacyBudget, steps_within_budget
from dpvision.privacy.plan import DPSettings, Plan, make_plan, parse_delta, resolve_delta

__all__ = [
    "ACCOUNTANTS",
    "ACCOUNTANT_REGISTRY",
    "Accountant",
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "AccountantWorkError",
    "DPSettings",
    "Plan",
    "PrivacyBudget",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "check_accountant",
    "check_noise_multiplier",
    "compute_epsilon",
    "compute_epsilons",
    "epsilon_notes",
    "expected_batch_size",
    "make_plan",
    "parse_delta",
    "poisson_sample_rate",
    "register_accountant",
    "resolve_delta",
    "steps_per_epoch",
    "steps_within_budget",
]

"""Privacy accounting: the ledger of what was spent, ε from it, σ calibration and budgets, bounds on σ."""

from dpvision.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    compute_epsilons,
    epsilon_notes,
    expected_batch_size,
    poisson_sample_rate,
    resolve_delta,
    steps_per_epoch,
)
from dpvision.privacy.bounds import (
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    AccountantWorkError,
    check_noise_multiplier,
)
from dpvision.privacy.budget import PrivacyBudget, steps_within_budget

__all__ = [
    "ACCOUNTANTS",
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "AccountantWorkError",
    "PrivacyBudget",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "check_noise_multiplier",
    "compute_epsilon",
    "compute_epsilons",
    "epsilon_notes",
    "expected_batch_size",
    "poisson_sample_rate",
    "resolve_delta",
    "steps_per_epoch",
    "steps_within_budget",
]

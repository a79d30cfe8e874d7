"""Privacy accounting: the ledger of what was spent, ε from it, σ calibration and budgets."""

from dpvision.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    compute_epsilons,
    poisson_sample_rate,
    resolve_delta,
    steps_per_epoch,
)
from dpvision.privacy.budget import PrivacyBudget, steps_within_budget

__all__ = [
    "ACCOUNTANTS",
    "PrivacyBudget",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "compute_epsilons",
    "poisson_sample_rate",
    "resolve_delta",
    "steps_per_epoch",
    "steps_within_budget",
]

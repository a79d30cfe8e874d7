"""Privacy accounting: the ledger of what was spent, ε from it, and σ calibration."""

from dpvision.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyLedger,
    calibrate_noise_multiplier,
    compute_epsilon,
    poisson_sample_rate,
    steps_per_epoch,
)

__all__ = [
    "ACCOUNTANTS",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "compute_epsilon",
    "poisson_sample_rate",
    "steps_per_epoch",
]

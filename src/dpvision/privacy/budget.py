"""A privacy budget: stop training before the first step that would exceed ε_max.

ε after n more steps is non-decreasing in n for every accountant (composition
only adds privacy loss), so the number of steps still allowed is found by an
exact integer bisection on n. The common case costs a single ε evaluation: if a
whole epoch fits, nothing else is computed, and that very ε (memoised in
:mod:`dpvision.privacy.accounting`) is the one the epoch's metrics row asks for
afterwards.

Bounded work: with PRV or PLD as the accountant, steps whose ε those accountants
cannot evaluate within bounded memory (:mod:`dpvision.privacy.bounds`) never fit,
so the budget stops a run there with a reason rather than fail; every other
evaluation is one the run's ledger could reach anyway (at most log2(planned) + 2
of them an epoch).

Example:
    >>> from dpvision.privacy.accounting import PrivacyLedger
    >>> budget = PrivacyBudget(max_epsilon=1.0, delta=1e-5, accountant="rdp")
    >>> ledger = PrivacyLedger()
    >>> n = budget.allowed_steps(ledger, noise_multiplier=1.0, sample_rate=0.01, planned=100_000)
    >>> ledger.extended(noise_multiplier=1.0, sample_rate=0.01, steps=n).epsilon(delta=1e-5) <= 1.0
    True
    >>> ledger.extended(noise_multiplier=1.0, sample_rate=0.01, steps=n + 1).epsilon(delta=1e-5) > 1.0
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpvision.privacy.accounting import PrivacyLedger, check_accountant
from dpvision.privacy.bounds import AccountantWorkError


def steps_within_budget(ledger: PrivacyLedger, *, noise_multiplier: float, sample_rate: float, planned: int,
                        max_epsilon: float, delta: float, accountant: str = "rdp") -> int:
    """The largest n in [0, planned] with ε(ledger + n steps of (σ, q)) <= ``max_epsilon``."""
    if planned <= 0:
        return 0

    def fits(n: int) -> bool:
        extended = ledger.extended(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=n)
        epsilon = _epsilon_or_none(extended, delta=delta, accountant=accountant)
        return epsilon is not None and epsilon <= max_epsilon

    if fits(planned):  # the usual case: one evaluation, reused by the epoch's metrics row
        return planned
    if not fits(0):  # already over (a budget lowered on a finished ledger): not a single step
        return 0
    low, high = 0, planned  # invariant: fits(low), not fits(high)
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low


def _epsilon_or_none(ledger: PrivacyLedger, *, delta: float, accountant: str) -> float | None:
    """ε, or None where PRV/PLD could not evaluate it within bounded memory (such steps never fit).

    The work grows with the steps, so "fits" stays monotone in n and the bisection exact.
    """
    try:
        return ledger.epsilon(delta=delta, accountant=accountant)
    except AccountantWorkError:
        return None


@dataclass(kw_only=True, frozen=True)
class PrivacyBudget:
    """ε_max at δ under one accountant: the most a run may spend."""

    max_epsilon: float
    delta: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not (self.max_epsilon > 0 and math.isfinite(self.max_epsilon)):
            raise ValueError(f"--max-epsilon must be a positive number, got {self.max_epsilon!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"--delta must be in (0, 1), got {self.delta!r}")
        check_accountant(self.accountant, "--accountant")

    def allowed_steps(self, ledger: PrivacyLedger, *, noise_multiplier: float, sample_rate: float,
                      planned: int) -> int:
        """How many of the ``planned`` next steps can be taken without ε exceeding the budget."""
        return steps_within_budget(ledger, noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                   planned=planned, max_epsilon=self.max_epsilon, delta=self.delta,
                                   accountant=self.accountant)

    def stop_reason(self, ledger: PrivacyLedger, *, noise_multiplier: float, sample_rate: float) -> str:
        """A sentence for ``summary.json`` saying why training stopped."""
        spent = ledger.epsilon(delta=self.delta, accountant=self.accountant)
        nxt = ledger.extended(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=1)
        after = _epsilon_or_none(nxt, delta=self.delta, accountant=self.accountant)
        head = f"privacy budget: after {ledger.steps} steps epsilon = {spent:.6g} ({self.accountant}, delta = {self.delta:g})"
        if after is None:
            return (f"{head}; the {self.accountant} accountant cannot account one more step within bounded memory "
                    f"(use --accountant rdp)")
        return f"{head}; one more step would make it {after:.6g} > --max-epsilon {self.max_epsilon:g}"

"""ε for Poisson-sampled Gaussian DP-SGD, and σ calibration.

Every engine records what it actually did in a :class:`PrivacyLedger`: a list of
``(noise_multiplier, sample_rate, steps)`` segments, the same history format as
Opacus's accountants. ε is always computed from that ledger, never from the plan.

Sampling convention (Opacus's ``DPDataLoader``): a training set of N examples
with batch size B has sample rate q = 1 / ceil(N / B) and an epoch is
int(1 / q) steps, in each of which every example is included independently
with probability q.

Example:
    >>> ledger = PrivacyLedger()
    >>> ledger.record(noise_multiplier=1.5, sample_rate=0.04, steps=2250)
    >>> round(ledger.epsilon(delta=1e-5), 8)
    7.32911117
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field

ACCOUNTANTS = ("rdp", "prv", "pld")
MAX_NOISE_MULTIPLIER = 1e4  # beyond this a target ε is considered unreachable
BATCH_SIZE_RTOL = 1e-12  # float error allowed in N * q before it is floored (q not of the form 1/m)
AUTO_DELTA_FACTOR = 10  # --delta auto: δ = 1 / (10 N), well below the 1/N where DP stops meaning much

History = tuple[tuple[float, float, int], ...]


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus's DPDataLoader sample rate: 1 / ceil(N / B)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples} and {batch_size}")
    return 1.0 / math.ceil(num_examples / batch_size)


def steps_per_epoch(sample_rate: float) -> int:
    """Steps in one epoch, exactly as Opacus's UniformWithReplacementSampler counts them."""
    return int(1 / sample_rate)


def expected_batch_size(num_examples: int, sample_rate: float) -> int:
    """E[batch size] rounded down: the divisor of the noisy gradient sum (Opacus's ``expected_batch_size``).

    For q = 1 / m (every rate :func:`poisson_sample_rate` makes, m = ceil(N / B))
    this is N // m, in exact integer arithmetic, and at least 1 since m <= N.
    Opacus computes ``int(N * q)`` in floating point, which is one too small
    whenever m divides N and fl(N * fl(1/m)) falls just below N / m: N = 49,
    B = 1 gives int(0.9999999999999999) = 0, a division by zero. Everywhere else
    the two agree (rounding can push N * q above an integer only for N > 1e15).
    Any other q is floored with a relative tolerance of ``BATCH_SIZE_RTOL``.

    Example:
        >>> expected_batch_size(49, poisson_sample_rate(49, 1)), int(49 * poisson_sample_rate(49, 1))
        (1, 0)
        >>> expected_batch_size(60_000, poisson_sample_rate(60_000, 256))
        255
    """
    if num_examples < 1 or not 0 < sample_rate <= 1:
        raise ValueError(f"need num_examples >= 1 and 0 < sample_rate <= 1, got {num_examples} and {sample_rate}")
    m = round(1 / sample_rate)
    if 1.0 / m == sample_rate:
        return num_examples // m
    expected = math.floor(num_examples * sample_rate * (1 + BATCH_SIZE_RTOL))
    if expected < 1:
        raise ValueError(f"expected batch size num_examples * sample_rate = {num_examples * sample_rate:.3g} is "
                         f"below 1: use a larger sample rate or more examples")
    return expected


def resolve_delta(delta: float | str, num_examples: int) -> float:
    """``"auto"`` becomes 1 / (10 N); a number (or numeric string) is returned as a float.

    Example:
        >>> resolve_delta("auto", 30_000)
        3.3333333333333333e-06
        >>> resolve_delta("1e-5", 30_000)
        1e-05
    """
    if isinstance(delta, str):
        if delta.strip().lower() == "auto":
            return 1.0 / (AUTO_DELTA_FACTOR * num_examples)
        try:
            delta = float(delta)
        except ValueError:
            raise ValueError(f"--delta must be a number in (0, 1) or 'auto', got {delta!r}") from None
    return float(delta)


def normalize_history(history) -> History:
    """Segments as a hashable tuple of ``(float σ, float q, int steps)``, empty segments dropped."""
    return tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)


def compute_epsilon(history, *, delta: float, accountant: str = "rdp") -> float:
    """ε after the steps in ``history`` (segments of ``(σ, q, steps)``) under ``accountant``.

    Results are memoised on ``(history, δ, accountant)``: PRV and PLD cost tenths of a
    second each, and a run asks for the same ε several times (budget check before an
    epoch, the per-epoch row after it, σ calibration's bisection).
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    return _cached_epsilon(normalize_history(history), float(delta), accountant)


def compute_epsilons(history, *, delta: float) -> dict[str, float]:
    """ε under every accountant: ``{"rdp": ..., "prv": ..., "pld": ...}``.

    Example:
        >>> eps = compute_epsilons([(1.5, 0.04, 2250)], delta=1e-5)
        >>> eps["prv"] <= eps["rdp"]
        True
    """
    return {name: compute_epsilon(history, delta=delta, accountant=name) for name in ACCOUNTANTS}


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(history: History, delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    try:
        if accountant == "pld":
            return _pld_epsilon(history, delta)
        from opacus.accountants import create_accountant

        acc = create_accountant(mechanism=accountant)
        acc.history = list(history)
        return float(acc.get_epsilon(delta=delta))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as err:
        # PRV's and PLD's discretisations fail far outside the usual range (tiny σ,
        # huge ε). ∞ is a valid, if useless, upper bound: never report less than spent.
        if accountant == "rdp":
            raise
        warnings.warn(f"{accountant} accountant failed ({err}); reporting epsilon = inf", stacklevel=3)
        return math.inf


def _pld_epsilon(history: History, delta: float) -> float:
    from dp_accounting import dp_event, pld

    acc = pld.PLDAccountant()
    for sigma, q, steps in history:
        event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
        acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


@dataclass
class PrivacyLedger:
    """What a run has spent: segments of ``(noise_multiplier, sample_rate, steps)``."""

    history: list[tuple[float, float, int]] = field(default_factory=list)

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        return compute_epsilon(self.history, delta=delta, accountant=accountant)

    def epsilons(self, *, delta: float) -> dict[str, float]:
        """ε under each of ``ACCOUNTANTS``."""
        return compute_epsilons(self.history, delta=delta)

    def copy(self) -> "PrivacyLedger":
        return PrivacyLedger(history=list(self.history))

    def extended(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> "PrivacyLedger":
        """A copy with ``steps`` more steps recorded (merged exactly as ``record`` merges them)."""
        ledger = self.copy()
        ledger.record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return ledger

    def state_dict(self) -> dict:
        return {"history": [list(seg) for seg in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    rtol: float = 1e-3,
) -> float:
    """The smallest σ (to ``rtol``) whose run of ``steps`` ends at ε <= ``target_epsilon``.

    The returned σ always satisfies ε(σ) <= target; bisection stops once
    ε(σ) >= target * (1 - rtol). ``accountant`` is the one whose ε the run will
    report (calibrating with RDP and reporting PRV would overshoot the noise). Raises ``ValueError`` when no σ up to
    ``MAX_NOISE_MULTIPLIER`` reaches the target.

    Example:
        >>> s = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=1000)
        >>> eps = compute_epsilon([(s, 0.01, 1000)], delta=1e-5)
        >>> 2.0 * (1 - 1e-3) <= eps <= 2.0
        True
    """
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target epsilon must be a positive finite number, got {target_epsilon}")

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")

    def eps(sigma: float) -> float:
        return compute_epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"target epsilon {target_epsilon} is unreachable for delta={delta}, sample rate "
                f"{sample_rate:.6g} and {steps} steps (even sigma={MAX_NOISE_MULTIPLIER:g} gives more)"
            )
    for _ in range(200):
        if eps(high) >= target_epsilon * (1 - rtol):
            break
        mid = (low + high) / 2
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high

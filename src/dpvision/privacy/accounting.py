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

from dpvision.privacy.accountants import ACCOUNTANT_REGISTRY, ACCOUNTANTS, History
from dpvision.privacy.bounds import (
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    AccountantWorkError,
    check_noise_multiplier,
    max_grid_points,
    min_noise_multiplier,
    skip_reason,
)

BATCH_SIZE_RTOL = 1e-12  # float error allowed in N * q before it is floored (q not of the form 1/m)


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus's DPDataLoader sample rate: 1 / ceil(N / B)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need num_examples >= 1 and batch_size >= 1, got {num_examples} and {batch_size}")
    return 1.0 / math.ceil(num_examples / batch_size)


def steps_per_epoch(sample_rate: float) -> int:
    """Steps in one epoch, exactly as Opacus's UniformWithReplacementSampler counts them.

    int(1 / q) in floating point: for some m (93, 99, 105, ...) int(1 / (1/m)) = m - 1, so
    such an epoch is one step short in both engines. ε is unaffected: the ledger records
    the steps actually taken, each at rate q.
    """
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


def normalize_history(history) -> History:
    """Segments as a hashable tuple of ``(float σ, float q, int steps)``, empty segments dropped.

    Raises a one-line ``ValueError`` for a σ that is negative or NaN, a q outside (0, 1]
    or negative steps: no accountant can say anything sensible about those.
    """
    segments = []
    for sigma, q, steps in history:
        sigma, q, steps = float(sigma), float(q), int(steps)
        if not sigma >= 0 or not 0 < q <= 1 or steps < 0:
            raise ValueError(f"ledger segment (noise_multiplier, sample_rate, steps) = ({sigma!r}, {q!r}, {steps}) "
                             f"is invalid: need sigma >= 0, 0 < sample_rate <= 1 and steps >= 0")
        if steps > 0:
            segments.append((sigma, q, steps))
    return tuple(segments)


def compute_epsilon(history, *, delta: float, accountant: str = "rdp") -> float:
    """ε after the steps in ``history`` (segments of ``(σ, q, steps)``) under ``accountant``.

    This is the primary accountant's ε (printed, budgeted, calibrated to), so PRV and PLD
    are never skipped here: a history whose grid would exceed their bounded memory raises
    :class:`~dpvision.privacy.bounds.AccountantWorkError` (a one-line ``ValueError``;
    front-ends refuse such runs up front with :func:`check_noise_multiplier`). Outside
    the validated σ range the answer is conservative, never smaller than the truth:
    ∞ for σ < ``MIN_NOISE_MULTIPLIER``, and σ > ``MAX_NOISE_MULTIPLIER`` counted as
    ``MAX_NOISE_MULTIPLIER`` (ε falls as σ grows). A negative ε (δ near 1) is reported as 0.

    Results are memoised on ``(history, δ, accountant)``: PRV and PLD cost tenths of a
    second to seconds each, and a run asks for the same ε several times (budget check
    before an epoch, the per-epoch row after it, σ calibration's bisection).
    """
    history = _checked(history, delta, accountant)
    value, note, too_much_work = _evaluate(history, float(delta), accountant)
    if too_much_work:
        raise AccountantWorkError(f"{note}; use --accountant rdp or a larger --sigma")
    return value


def compute_epsilons(history, *, delta: float, primary: str | None = None) -> dict[str, float]:
    """ε under every rigorous accountant (:data:`ACCOUNTANTS`): ``{"rdp": ..., "prv": ..., "pld": ...}``.

    A ``primary`` outside :data:`ACCOUNTANTS` (a registered approximation, e.g. ``gdp``) is
    added to the dict: the run reports it, and its rows still carry every rigorous ε.

    ``primary`` is computed as :func:`compute_epsilon` computes it (PRV or PLD as primary
    raise rather than be skipped). Every other accountant (all of them when ``primary``
    is None) is computed only where its work is bounded; elsewhere its entry is ``math.inf``,
    a valid if useless upper bound, and :func:`epsilon_notes` says why. RDP is always computed.

    Example:
        >>> eps = compute_epsilons([(1.5, 0.04, 2250)], delta=1e-5)
        >>> eps["prv"] <= eps["rdp"]
        True
        >>> compute_epsilons([(0.1, 0.5, 3540)], delta=1e-5, primary="rdp")["pld"]
        inf
    """
    if primary is not None:
        check_accountant(primary)
    history = _checked(history, delta, "rdp")
    names = ACCOUNTANTS if primary in ACCOUNTANTS or primary is None else (*ACCOUNTANTS, primary)
    return {name: compute_epsilon(history, delta=delta, accountant=name) if name == primary
            else _evaluate(history, float(delta), name)[0] for name in names}


def epsilon_notes(history, *, delta: float) -> dict[str, str]:
    """Why an accountant's ε in :func:`compute_epsilons` is not a computed value: ``{name: reason}``.

    Only accountants with something to say appear (σ = 0, σ out of range, a grid too
    large to evaluate, a numerical failure); an empty dict means all were computed.

    Example:
        >>> epsilon_notes([(1.3, 1 / 118, 3540)], delta=1e-5)
        {}
        >>> epsilon_notes([(0.1, 0.5, 3540)], delta=1e-5)["prv"]
        'prv not computed: its grid would have 6.47e+09 points (limit 4e+06)'
    """
    history = _checked(history, delta, "rdp")
    notes = {name: _evaluate(history, float(delta), name)[1] for name in ACCOUNTANTS}
    return {name: note for name, note in notes.items() if note}


def _checked(history, delta: float, accountant: str) -> History:
    check_accountant(accountant)
    if not 0 < delta < 1:
        raise ValueError(f"--delta must be in (0, 1), got {delta!r}")
    return normalize_history(history)


@functools.lru_cache(maxsize=4096)
def _evaluate(history: History, delta: float, accountant: str) -> tuple[float, str | None, bool]:
    """(ε, note or None, True when skipped for too much work). Never raises for RDP in range."""
    if not history:
        return 0.0, None, False
    smallest = min(s for s, _, _ in history)
    if smallest == 0:
        return math.inf, "sigma = 0: no noise, no privacy guarantee", False
    if smallest < MIN_NOISE_MULTIPLIER:
        return math.inf, (f"sigma = {smallest:g} is below {MIN_NOISE_MULTIPLIER:g}: not computed (epsilon would "
                          f"be in the tens or more after one step)"), False
    note = None
    if max(s for s, _, _ in history) > MAX_NOISE_MULTIPLIER:
        history = tuple((min(s, MAX_NOISE_MULTIPLIER), q, n) for s, q, n in history)
        note = f"sigma above {MAX_NOISE_MULTIPLIER:g} counted as {MAX_NOISE_MULTIPLIER:g} (a conservative upper bound)"
    try:
        if max_grid_points(accountant) is not None:
            reason = skip_reason(history, delta=delta, accountant=accountant)
            if reason is not None:
                return math.inf, reason, True
        value = _epsilon(history, delta, accountant)
    except (ValueError, RuntimeError, ArithmeticError) as err:
        # PRV's and PLD's numerics may still fail at the edges of their range (δ near 1, or so
        # small that δ/1000 underflows). ∞ is a valid, if useless, upper bound: never report
        # less than spent. RDP must not fail in range.
        if accountant == "rdp":
            raise
        warnings.warn(f"{accountant} accountant failed ({err}); reporting epsilon = inf", stacklevel=3)
        return math.inf, f"{accountant} failed: {err or type(err).__name__}", False
    if value == math.inf and note is None:
        note = f"{accountant} gives epsilon = inf at delta = {delta:g}"
    return max(value, 0.0), note, False


def _epsilon(history: History, delta: float, accountant: str) -> float:
    return ACCOUNTANT_REGISTRY[accountant].epsilon(history, delta)


def check_accountant(name: str, where: str = "dp.accountant") -> str:
    """``name`` if it is a registered accountant, else a one-line ``ValueError`` naming ``where``."""
    if name not in ACCOUNTANT_REGISTRY:
        raise ValueError(f"{where} must be one of {', '.join(ACCOUNTANT_REGISTRY)}, got {name!r}")
    return name


@dataclass
class PrivacyLedger:
    """What a run has spent: segments of ``(noise_multiplier, sample_rate, steps)``.

    The first ``released`` segments are what the run released before training (``Plan.releases``: a private
    input normalisation's Gaussian releases, :meth:`starting_with`): in every ε, but not optimizer steps, so
    :attr:`steps` skips them and :meth:`record` never merges a step into them.
    """

    history: list[tuple[float, float, int]] = field(default_factory=list)
    released: int = 0

    @classmethod
    def starting_with(cls, releases) -> "PrivacyLedger":
        """A run's ledger before its first step: ``releases`` ``((σ, q, n), ...)`` spent (empty: nothing)."""
        history = [(float(s), float(q), int(n)) for s, q, n in releases]
        return cls(history=history, released=len(history))

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if steps <= 0:
            return
        if len(self.history) > self.released and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def steps(self) -> int:
        """Optimizer steps recorded (the releases before training are none)."""
        return sum(n for _, _, n in self.history[self.released:])

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        return compute_epsilon(self.history, delta=delta, accountant=accountant)

    def epsilons(self, *, delta: float, primary: str | None = None) -> dict[str, float]:
        """ε under each of ``ACCOUNTANTS`` (secondary ones only where cheap: see :func:`compute_epsilons`)."""
        return compute_epsilons(self.history, delta=delta, primary=primary)

    def epsilon_notes(self, *, delta: float) -> dict[str, str]:
        """Why some of :meth:`epsilons` are ∞ (see :func:`epsilon_notes`)."""
        return epsilon_notes(self.history, delta=delta)

    def copy(self) -> "PrivacyLedger":
        return PrivacyLedger(history=list(self.history), released=self.released)

    def extended(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> "PrivacyLedger":
        """A copy with ``steps`` more steps recorded (merged exactly as ``record`` merges them)."""
        ledger = self.copy()
        ledger.record(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return ledger

    def state_dict(self) -> dict:
        return {"history": [list(seg) for seg in self.history], "released": self.released}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        self.released = int(state.get("released", self.released))  # (older checkpoints: the plan's, as started)


def _check_calibration_inputs(target_epsilon: float, accountant: str, steps: int) -> None:
    """One-line ``ValueError`` for a target, accountant or step count that calibration cannot use."""
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target epsilon must be a positive finite number, got {target_epsilon}")
    check_accountant(accountant)
    if steps < 1:
        raise ValueError(f"calibration needs at least one step, got {steps}")


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    rtol: float = 1e-3,
    releases=(),
) -> float:
    """The smallest σ (to ``rtol``) whose run of ``steps`` ends at ε <= ``target_epsilon``, ε being that of
    ``releases`` (history segments spent before the steps: a private input normalisation) and the steps.

    The returned σ always satisfies ε(σ) <= target; bisection stops once
    ε(σ) >= target * (1 - rtol). ``accountant`` is the one whose ε the run will
    report (calibrating with RDP and reporting PRV would overshoot the noise).

    The search stays in [σ_low, ``MAX_NOISE_MULTIPLIER``], σ_low being
    ``MIN_NOISE_MULTIPLIER`` for RDP and, for PRV and PLD, the smallest σ whose grid
    for this run is within bounds (:func:`~dpvision.privacy.bounds.min_noise_multiplier`),
    so no evaluation ever leaves the bounded region. A one-line ``ValueError`` when
    the target needs σ above ``MAX_NOISE_MULTIPLIER`` (unreachable) or below σ_low
    (a target that large is no guarantee, or needs the RDP accountant).

    Example:
        >>> s = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=1000)
        >>> eps = compute_epsilon([(s, 0.01, 1000)], delta=1e-5)
        >>> 2.0 * (1 - 1e-3) <= eps <= 2.0
        True
    """
    _check_calibration_inputs(target_epsilon, accountant, steps)

    def eps(sigma: float) -> float:
        return compute_epsilon([*releases, (sigma, sample_rate, steps)], delta=delta, accountant=accountant)

    setting = f"delta={delta:g}, sample rate {sample_rate:.6g} and {steps} steps"
    floor = min_noise_multiplier(accountant, sample_rate=sample_rate, steps=steps, delta=delta)
    # The bracket starts at (0, 1] and doubles, as it always has (so a given target gives the same σ
    # bit for bit as before the bounds existed); midpoints below the floor are not evaluated but
    # count as too little noise, which can only make the returned σ larger (more private).
    low, high = 0.0, max(1.0, floor)
    while eps(high) > target_epsilon:
        if high >= MAX_NOISE_MULTIPLIER:
            raise ValueError(f"target epsilon {target_epsilon} is unreachable for {setting} (even "
                             f"sigma={MAX_NOISE_MULTIPLIER:g} gives more)")
        low, high = high, min(2 * high, MAX_NOISE_MULTIPLIER)
    if low < floor and eps(floor) < target_epsilon * (1 - rtol):  # the target needs σ below the floor
        why = (f"sigma must be at least {MIN_NOISE_MULTIPLIER:g}" if floor == MIN_NOISE_MULTIPLIER else
               f"the {accountant} accountant needs sigma >= {floor:g} here; use --accountant rdp")
        raise ValueError(f"target epsilon {target_epsilon} needs sigma < {floor:g} for {setting} (sigma = "
                         f"{floor:g} already gives epsilon = {eps(floor):.4g}), but {why}")
    for _ in range(200):  # invariant: eps(low) > target >= eps(high) (or low below the floor)
        if eps(high) >= target_epsilon * (1 - rtol):
            break
        mid = (low + high) / 2
        if mid >= floor and eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def noise_multiplier_for(noise_multiplier: float, *, target_epsilon: float | None, delta: float,
                         sample_rate: float, steps: int, accountant: str, check_work: bool = False,
                         releases=()) -> float:
    """σ of a planned DP run: ``noise_multiplier`` as given, or, with ``target_epsilon``, calibrated to it
    (the run's ε including ``releases``, the history segments spent before its steps).

    A target that cannot be met is a one-line ``ValueError`` naming ``dp.target_epsilon``. With
    ``check_work`` σ must also be 0 or in range, and, with PRV or PLD as ``accountant``, accountable
    within bounded memory for the planned run (:func:`~dpvision.privacy.bounds.check_noise_multiplier`).
    """
    sigma = noise_multiplier
    if target_epsilon is not None:
        try:
            sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate,
                                               steps=steps, accountant=accountant, releases=releases)
        except ValueError as err:
            raise ValueError(f"dp.target_epsilon: {err}") from None
    if check_work:
        check_noise_multiplier(sigma, "dp.noise_multiplier", accountant=accountant, sample_rate=sample_rate,
                               steps=steps, delta=delta, accountant_flag="dp.accountant")
    return sigma

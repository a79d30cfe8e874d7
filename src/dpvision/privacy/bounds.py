"""Bounds on σ and on the accountants' work: no noise multiplier may hang or exhaust memory.

* σ is 0 (no noise: ε = ∞) or in [``MIN_NOISE_MULTIPLIER``, ``MAX_NOISE_MULTIPLIER``]
  (:func:`check_noise_multiplier`). At σ = 0.1 one step already costs ε ≈ 80
  (RDP, q = 1/118, δ = 1e-5; still 37 at q = 1e-7): below it no guarantee is
  left, PRV's and PLD's grids grow without bound (σ = 0.01: 500 s, 18 GB) and
  RDP fails outright at σ = 1e-300. Above 1e4 RDP fails (σ = 1e8, 1e308) while
  noise of std 1e4 C drowns the clipped sum of any batch of realistic size.
* RDP's cost does not grow with the steps: it is always computed. PRV and PLD
  discretise the privacy loss on a grid whose size is predicted here, cheaply
  and before any allocation, from the same RDP tail bound PRV uses for its
  domain (:func:`grid_points`). Above their registered ``max_grid_points`` (measured: seconds and
  hundreds of MB at the limit; docs/privacy.md, "Bounds on σ and on the
  accountants' work") they are not evaluated: as a secondary accountant ε = ∞
  with a reason, as the primary one the run is refused up front
  (:func:`check_noise_multiplier` with the planned run).

Histories here are normalised ``((σ, q, steps), ...)`` tuples with σ > 0.

Example:
    >>> check_noise_multiplier(1.3)
    1.3
    >>> check_noise_multiplier(1e-5)
    Traceback (most recent call last):
    ...
    ValueError: --sigma must be 0 (no noise) or in [0.1, 10000], got 1e-05
    >>> grid_points(((1.3, 1 / 118, 3540),), delta=1e-5, accountant="prv") < max_grid_points("prv")
    True
"""

from __future__ import annotations

import functools
import math
import warnings

from dpvision.privacy.accountants import (
    ACCOUNTANT_REGISTRY,
    PLD_DISCRETIZATION,
    PRV_DELTA_ERROR_FACTOR,
    PRV_EPS_ERROR,
    History,
)

MIN_NOISE_MULTIPLIER = 0.1  # below: ε in the tens after one step (no guarantee left)
MAX_NOISE_MULTIPLIER = 1e4  # above: RDP's numerics fail; noise std 1e4 C drowns any realistic batch
# The grid points PRV and PLD may use are their registry entries' ``max_grid_points`` (measured in
# docs/privacy.md: near the limits each call takes 1-3 CPU seconds and at most ~0.4 GB; at twice
# the limits up to 15 s and 1-3 GB).
PLD_MAX_SINGLE_STEP_POINTS = 200_000  # one step's PLD costs ~8 CPU µs a point to build: ~2 s here


class AccountantWorkError(ValueError):
    """The chosen accountant would need more than its bounded time and memory for this history."""


def check_noise_multiplier(value: float, flag: str = "--sigma", *, accountant: str = "rdp",
                           sample_rate: float | None = None, steps: int | None = None, delta: float | None = None,
                           accountant_flag: str = "--accountant") -> float:
    """``value`` as a float if it is 0 (no noise; warns) or in [MIN, MAX]; else a one-line ``ValueError``.

    With ``accountant`` PRV or PLD and the planned run (``sample_rate``, ``steps`` in all,
    ``delta``) also refuses, up front, a run that accountant cannot account within
    bounded memory (:class:`AccountantWorkError`, naming the smallest σ it could). One
    step more than ``steps`` is checked: a budget's stop reason asks for it.

    Example:
        >>> check_noise_multiplier(1.3, accountant="pld", sample_rate=1 / 118, steps=3540, delta=1e-5)
        1.3
        >>> try:
        ...     check_noise_multiplier(0.2, accountant="pld", sample_rate=1 / 118, steps=3540, delta=1e-5)
        ... except ValueError as err:
        ...     print(err)
        --accountant pld needs --sigma >= 0.44 for sample rate 0.00847458, 3540 steps and delta 1e-05 (pld not computed: its grid would have 1.22e+07 points (limit 1e+07)); use --accountant rdp
    """
    if accountant not in ACCOUNTANT_REGISTRY:
        raise ValueError(f"{accountant_flag} must be one of {', '.join(ACCOUNTANT_REGISTRY)}, got {accountant!r}")
    sigma = float(value)
    if sigma == 0:
        warnings.warn(f"{flag} 0 adds no noise: epsilon = inf, no privacy guarantee", stacklevel=2)
        return 0.0
    if not MIN_NOISE_MULTIPLIER <= sigma <= MAX_NOISE_MULTIPLIER:  # also NaN and ±inf
        raise ValueError(f"{flag} must be 0 (no noise) or in [{MIN_NOISE_MULTIPLIER:g}, "
                         f"{MAX_NOISE_MULTIPLIER:g}], got {value!r}")
    if max_grid_points(accountant) is None or None in (sample_rate, steps, delta) or steps <= 0:
        return sigma
    reason = skip_reason(((sigma, float(sample_rate), int(steps) + 1),), delta=delta, accountant=accountant)
    if reason is not None:
        need = min_noise_multiplier(accountant, sample_rate=sample_rate, steps=int(steps) + 1, delta=delta)
        raise AccountantWorkError(
            f"{accountant_flag} {accountant} needs {flag} >= {need:.3g} for sample rate {sample_rate:.6g}, "
            f"{steps} steps and delta {delta:g} ({reason}); use {accountant_flag} rdp")
    return sigma


def max_grid_points(accountant: str) -> int | None:
    """The registered bound on ``accountant``'s grid (None: its work does not grow with the steps)."""
    return ACCOUNTANT_REGISTRY[accountant].max_grid_points


def grid_points(history: History, *, delta: float, accountant: str) -> int:
    """Grid points ``accountant`` would allocate for ``history`` (0 for RDP, whose cost is fixed).

    PRV: exactly Opacus's domain, 2 (L + 3) / mesh with L from RDP at δ/4000 and mesh
    ``PRV_EPS_ERROR`` / sqrt(T log(12000/δ) / 2). PLD: the larger of one step's
    connect-the-dots grid (exact) and the composition's, estimated as 2 (L + 3) /
    ``PLD_DISCRETIZATION`` (measured within a factor 1.3 of dp_accounting's Chernoff-
    truncated size). Both grow as σ falls and as the steps grow.
    """
    if max_grid_points(accountant) is None or not history:
        return 0
    return _grid_points(history, float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def _grid_points(history: History, delta: float, accountant: str) -> int:
    half_width = _prv_domain_half_width(history, delta)  # L + 3
    if accountant == "prv":
        steps = sum(n for _, _, n in history)
        delta_error = delta * PRV_DELTA_ERROR_FACTOR
        mesh = PRV_EPS_ERROR / math.sqrt(steps * math.log(12 / delta_error) / 2)
        return math.ceil(2 * half_width / mesh) + 2
    single = max(_pld_single_step_points(sigma, q) for sigma, q, _ in history)
    return max(single, math.ceil(2 * half_width / PLD_DISCRETIZATION))


def skip_reason(history: History, *, delta: float, accountant: str) -> str | None:
    """Why ``accountant`` must not be evaluated on ``history`` (too much work), or None when it may."""
    limit = max_grid_points(accountant)
    if limit is None:
        return None
    points = grid_points(history, delta=delta, accountant=accountant)
    if points > limit:
        return f"{accountant} not computed: its grid would have {points:.3g} points (limit {limit:.3g})"
    if accountant == "pld":
        single = max(_pld_single_step_points(sigma, q) for sigma, q, _ in history)
        if single > PLD_MAX_SINGLE_STEP_POINTS:
            return (f"pld not computed: one step's grid would have {single:.3g} points "
                    f"(limit {PLD_MAX_SINGLE_STEP_POINTS:.3g}; sigma too small)")
    return None


def min_noise_multiplier(accountant: str, *, sample_rate: float, steps: int, delta: float) -> float:
    """The smallest σ in [MIN, MAX] (to 0.1%, rounded up) at which ``accountant`` can account ``steps`` steps.

    Work falls as σ grows, so this is a bisection on log σ over the cheap grid prediction.
    Raises :class:`AccountantWorkError` when even ``MAX_NOISE_MULTIPLIER`` is too much work.

    Example:
        >>> min_noise_multiplier("rdp", sample_rate=0.01, steps=10**9, delta=1e-5)
        0.1
        >>> 0.1 < min_noise_multiplier("pld", sample_rate=0.01, steps=1000, delta=1e-5) < 1.0
        True
    """

    def fits(sigma: float) -> bool:
        return skip_reason(((sigma, float(sample_rate), int(steps)),), delta=delta, accountant=accountant) is None

    low, high = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    if steps <= 0 or fits(low):
        return low
    if not fits(high):
        raise AccountantWorkError(
            f"the {accountant} accountant cannot account {steps} steps at sample rate {sample_rate:.6g} within "
            f"bounded memory even at sigma = {high:g}; use the rdp accountant")
    while high / low > 1 + 1e-3:  # invariant: not fits(low), fits(high)
        mid = math.sqrt(low * high)
        if fits(mid):
            high = mid
        else:
            low = mid
    return _round_up(high)


def _round_up(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits (more σ is never less safe)."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale) / scale


def _prv_domain_half_width(history: History, delta: float) -> float:
    """L + 3 of Opacus's PRV domain [-L-3, L+3]: an RDP tail bound on the privacy loss (a few RDP calls)."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")  # RDP at large σ: still a valid bound
        return float(compute_safe_domain_size(prvs, [n for _, _, n in history], eps_error=PRV_EPS_ERROR,
                                              delta_error=delta * PRV_DELTA_ERROR_FACTOR))


@functools.lru_cache(maxsize=1024)
def _pld_single_step_points(sigma: float, sample_rate: float) -> int:
    """Points of dp_accounting's connect-the-dots PMF of one Poisson-sampled Gaussian step (both directions)."""
    from dp_accounting.pld import privacy_loss_mechanism as mechanism

    points = 0
    for adjacency in (mechanism.AdjacencyType.REMOVE, mechanism.AdjacencyType.ADD):
        bounds = mechanism.GaussianPrivacyLoss(sigma, sampling_prob=sample_rate,
                                               adjacency_type=adjacency).connect_dots_bounds()
        points = max(points, math.ceil((bounds.epsilon_upper - bounds.epsilon_lower) / PLD_DISCRETIZATION) + 1)
    return points

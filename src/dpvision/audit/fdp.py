"""The f-DP analysis of a one-run audit (Mahloujifar, Melis and Chaudhuri, ICML 2025).

Steinke et al.'s analysis (:mod:`dpvision.audit.stats`) tests the hypothesis "the
run is (ε, δ)-DP" for one (ε, δ) pair. A DP-SGD run satisfies much more: a whole
trade-off curve f (the accountant's privacy profile δ(ε) at every ε). Mahloujifar
et al. test "the run is f-DP" directly, which rejects far more of the
hypotheses a correct run does not satisfy, so the bound is tighter.

**The test.** m canaries, each in with probability 1/2; the auditor makes k
guesses (abstaining on the rest), c of them correct. If the run is f-DP, then
"c or more correct" has probability below β unless the recursion of their
Algorithm ("audit with cap") stays feasible: starting from the masses
r = β c / m (correct guesses) and h = β (k - c) / m (wrong ones), each step
i = c - 1, ..., 0 raises h to at least g(r), the least probability that the
other world can give an event of probability r (g is f's inverse blow-up),
and moves the matching share i / (k - i) of that increase onto r. If the masses
outgrow the fraction of guesses (r + h > k / m), no f-DP run can produce the
observation with probability β: the hypothesis is rejected at level β.

**The curves.** ``TradeOff`` holds a privacy profile on a grid of ε (from a PLD
of the whole run): g(x) = max_j max(0, (x - δ(ε_j)) e^(-ε_j)). A coarser grid
keeps fewer supporting lines, so g is smaller and the test rejects less: still
valid. The family tested is DP-SGD with the run's claimed sample rate q and
step count T and a noise multiplier σ' (:func:`dpsgd_tradeoff`); the bound is
the accountant's ε (PLD) of the smallest σ' the test rejects. It is a lower bound
on ε *for runs whose trade-off curve is DP-SGD's at some σ'* (the claim being
audited); Steinke et al.'s bound holds without that assumption.

Example:
    >>> curve = dpsgd_tradeoff(noise_multiplier=1.0, sample_rate=1.0, steps=1)  # the Gaussian mechanism
    >>> fdp_rejects(curve, m=1000, guesses=100, correct=100, beta=0.05)  # 100/100: too many for μ = 1
    True
    >>> fdp_rejects(curve, m=1000, guesses=100, correct=70, beta=0.05)
    False
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy import optimize, stats

EPSILON_GRID = np.linspace(0.0, 40.0, 801)  # the supporting lines kept (step 0.05)
PLD_DISCRETIZATION = 1e-3  # pessimistic PLD: coarser than the accountant's 1e-4, still an upper bound on δ(ε)
COARSE_DISCRETIZATION = 2e-2  # the guess plan's quick curves: coarser still (rejects less), only to rank pairs
SIGMA_FLOOR = 0.4  # smallest σ' tried: below it the PLD grid explodes (privacy.bounds); bounds there say ">="
SIGMA_CEILING = 100.0  # largest σ' tried: a run more private than this is indistinguishable from no training


@dataclass(frozen=True)
class TradeOff:
    """A privacy profile δ(ε_j) on a grid [J]; both directions of adjacency (the worse of the two)."""

    epsilons: np.ndarray  # [J]
    deltas: np.ndarray  # [J]

    def __post_init__(self) -> None:
        # g(x) = max(0, max_j e^(-ε_j) x - δ_j e^(-ε_j)) is convex and piecewise linear: keep only the lines on
        # its upper envelope and their breakpoints, so that g(x) is one bisection (the audits call it ~10^4 times).
        hull = _upper_envelope(np.exp(-self.epsilons), self.deltas)
        breaks = [(b0 - b1) / (a1 - a0) for (a0, b0), (a1, b1) in zip(hull, hull[1:])]
        object.__setattr__(self, "_hull", hull)
        object.__setattr__(self, "_breaks", breaks)

    def inverse_blow_up(self, x: float) -> float:
        """The least probability the neighbouring run can give an event of probability ``x``."""
        a, b = self._hull[bisect.bisect_right(self._breaks, x)]
        return max(0.0, a * x + b)


def _upper_envelope(slopes: np.ndarray, deltas: np.ndarray) -> list[tuple[float, float]]:
    """The lines (slope a_j, intercept -δ_j a_j) [J] and the zero line that reach max(0, max_j ...), slope ascending."""
    useful = deltas < 1  # δ >= 1: the line is <= 0 on [0, 1]
    zero = useful & (deltas <= 0)  # lines through 0: only the steepest one can matter
    keep = useful & ~zero
    if zero.any():
        keep[np.flatnonzero(zero)[np.argmax(slopes[zero])]] = True
    order = np.lexsort((-deltas[keep], slopes[keep]))  # slope ascending, then intercept ascending
    a, b = np.r_[0.0, slopes[keep][order]], np.r_[0.0, (-deltas[keep] * slopes[keep])[order]]  # the zero line first
    if np.all(np.diff(a) > 0):
        breaks = (b[:-1] - b[1:]) / (a[1:] - a[:-1])  # where each line overtakes the previous one
        if np.all(np.diff(breaks) > 0):  # already the envelope (a convex profile's usual case): no pruning
            return list(zip(a.tolist(), b.tolist()))
    lines = list(zip(a[1:].tolist(), b[1:].tolist()))
    hull: list[tuple[float, float]] = [(0.0, 0.0)]  # the zero line: g >= 0
    for a, b in lines:
        while hull and hull[-1][0] == a:  # the same slope: the later one has the larger intercept
            hull.pop()
        while len(hull) >= 2 and _redundant(hull[-2], hull[-1], (a, b)):
            hull.pop()
        hull.append((a, b))
    return hull


def _redundant(low: tuple[float, float], mid: tuple[float, float], high: tuple[float, float]) -> bool:
    """Slopes low < mid < high: ``mid`` is nowhere above both others (it never reaches the envelope)."""
    (a1, b1), (a2, b2), (a3, b3) = low, mid, high
    return (b3 - b1) * (a2 - a1) >= (b2 - b1) * (a3 - a1)


@lru_cache(maxsize=256)
def _pld(noise_multiplier: float, sample_rate: float, steps: int, discretization: float = PLD_DISCRETIZATION):
    one = pld_lib.from_gaussian_mechanism(noise_multiplier, sampling_prob=sample_rate,
                                         value_discretization_interval=discretization)
    return one.self_compose(steps)


def gaussian_deltas(mu: float, epsilons: np.ndarray) -> np.ndarray:
    """The μ-GDP privacy profile δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) (Dong, Roth and Su 2022), exact."""
    epsilons = np.asarray(epsilons, dtype=np.float64)
    far = np.exp(epsilons + stats.norm.logcdf(-epsilons / mu - mu / 2))  # e^ε Φ(...) without overflow
    return np.clip(stats.norm.cdf(-epsilons / mu + mu / 2) - far, 0.0, 1.0)


@lru_cache(maxsize=512)
def dpsgd_tradeoff(*, noise_multiplier: float, sample_rate: float, steps: int, coarse: bool = False) -> TradeOff:
    """The trade-off curve of ``steps`` Poisson-sampled Gaussian steps (σ, q) as a privacy profile on the grid.

    At q = 1 the steps compose to the Gaussian mechanism with μ = √T / σ: its exact profile (closed form).
    Otherwise a PLD (``coarse``: a quicker, more pessimistic discretisation)."""
    if sample_rate >= 1:
        return TradeOff(EPSILON_GRID, gaussian_deltas(math.sqrt(steps) / noise_multiplier, EPSILON_GRID))
    pld = _pld(noise_multiplier, sample_rate, steps, COARSE_DISCRETIZATION if coarse else PLD_DISCRETIZATION)
    deltas = np.asarray(pld.get_delta_for_epsilon(EPSILON_GRID))
    return TradeOff(EPSILON_GRID, np.clip(deltas, 0.0, 1.0))


@lru_cache(maxsize=1024)
def dpsgd_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of the same curve (the currency of the f-DP bound): exact at q = 1, else the PLD's."""
    if sample_rate >= 1:
        mu = math.sqrt(steps) / noise_multiplier

        def excess(epsilon: float) -> float:  # δ(ε) - δ, decreasing in ε
            return float(gaussian_deltas(mu, np.array([epsilon]))[0]) - delta

        if excess(0.0) <= 0:
            return 0.0
        high = 1.0
        while excess(high) > 0:
            high *= 2
        return float(optimize.brentq(excess, 0.0, high, xtol=1e-9))
    return float(_pld(noise_multiplier, sample_rate, steps).get_epsilon_for_delta(delta))


def dpsgd_out_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of the one direction "the run without the canary" vs "with it" (P_out <= e^ε P_in + δ) at ``delta``.

    Poisson sampling bounds it by T log(1 / (1 - q)) even at δ = 0 (an included canary is never sampled
    with probability (1 - q)^T, and then the run is the run without it); with noise it is smaller still.
    dp_accounting keeps this direction as the PLD's "add" distribution."""
    floor = -steps * math.log1p(-sample_rate) if sample_rate < 1 else math.inf
    if noise_multiplier <= 0:
        return floor
    pmf = _pld(noise_multiplier, sample_rate, steps)._pmf_add  # [the bounded direction's privacy losses]
    return float(min(floor, pmf.get_epsilon_for_delta(delta)))


def fdp_rejects(curve: TradeOff, *, m: int, guesses: int, correct: int, beta: float) -> bool:
    """True when ``correct`` of ``guesses`` right (m canaries) has probability < ``beta`` for every f-DP run."""
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")
    if correct == 0:
        return False
    right, wrong = beta * correct / m, beta * (guesses - correct) / m
    for i in range(correct - 1, -1, -1):
        raised = max(wrong, curve.inverse_blow_up(right))
        if raised == wrong:  # nothing moves any more: the remaining steps change neither mass
            break
        right = min(right + i / (guesses - i) * (raised - wrong), 1.0)
        wrong = raised
    return right + wrong > guesses / m


def rejecting_pair(counts: list[tuple[int, int, int]], *, m: int, sample_rate: float, steps: int,
                   noise_multiplier: float, beta: float, coarse: bool = False) -> tuple[int, int, int] | None:
    """The first guess pair (k+, k-, correct) whose count rejects DP-SGD at σ' = ``noise_multiplier``."""
    curve = dpsgd_tradeoff(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, coarse=coarse)
    for k_plus, k_minus, correct in counts:
        if fdp_rejects(curve, m=m, guesses=k_plus + k_minus, correct=correct, beta=beta):
            return k_plus, k_minus, correct
    return None


@dataclass
class FdpBound:
    """The smallest σ' whose DP-SGD curve the best guess pair rejects, and its ε (0: none rejected)."""

    epsilon_lower_bound: float
    noise_multiplier: float | None  # σ' at the bound (None: nothing rejected)
    at_floor: bool  # even σ' = SIGMA_FLOOR was rejected: the true bound is larger still
    k_plus: int
    k_minus: int
    correct: int


def fdp_lower_bound(counts: list[tuple[int, int, int]], *, m: int, sample_rate: float, steps: int,
                    delta: float, beta: float, coarse: bool = False) -> FdpBound:
    """Bound from guess ``counts`` [(k+, k-, correct)], each pair tested at ``beta`` (already corrected).

    σ' is searched on the lattice SIGMA_FLOOR (1 + r)^j (r = 0.001, or 0.05 when ``coarse``), so that
    many searches share their curves (the guess plan runs one per candidate pair)."""
    ratio = 1.05 if coarse else 1.001
    top = math.ceil(math.log(SIGMA_CEILING / SIGMA_FLOOR) / math.log(ratio))

    def sigma(j: int) -> float:
        return round(min(SIGMA_CEILING, SIGMA_FLOOR * ratio**j), 10)

    def rejected_by(j: int) -> tuple[int, int, int] | None:
        return rejecting_pair(counts, m=m, sample_rate=sample_rate, steps=steps, noise_multiplier=sigma(j),
                              beta=beta, coarse=coarse)

    best = rejected_by(top)
    if best is None:
        return FdpBound(0.0, None, False, 0, 0, 0)
    low, high = -1, top  # invariant: high is rejected, low is not (-1: below the floor, never tried)
    while high - low > 1:  # rejection is monotone: larger σ' = a more private claim
        mid = (low + high + 1) // 2 if low < 0 else (low + high) // 2
        found = rejected_by(mid)
        low, high = (low, mid) if found else (mid, high)
        best = found or best
    eps = dpsgd_epsilon(noise_multiplier=sigma(high), sample_rate=sample_rate, steps=steps, delta=delta)
    return FdpBound(eps, sigma(high), high == 0, *best)

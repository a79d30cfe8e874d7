"""The statistics of a one-run audit (Steinke, Nasr and Jagielski, NeurIPS 2023).

m canaries are each included in training independently with probability 1/2
(S_i = +1 in, -1 out). After training the auditor scores every canary, guesses
"in" for the k+ highest scores, "out" for the k- lowest, and abstains on the
rest: r = k+ + k- guesses, of which W are correct.

Their Theorem (with the δ term of their Algorithm 2 / Proposition 5.2): if the
training run is (ε, δ)-DP with respect to the canaries, then for every v

    P[W >= v] <= P[Binomial(r, p) >= v] + 2 m δ · max_{i=1..v} P[v - i <= Binomial(r, p) < v] / i,

with p = e^ε / (1 + e^ε) (the accuracy of ε-randomised response). The right-hand
side is a p-value for the null hypothesis "the run is (ε, δ)-DP"; the reported
lower bound is the largest ε that this p-value rejects at level 1 - confidence.

Choosing (k+, k-): the guesser may use the scores but not S, so picking the pair
that gives the best bound *after* counting correct guesses is a multiple
comparison. dpvision tries a fixed grid of J pairs and tests each at level
β / J (Bonferroni), so the bound holds at the stated confidence for the best
pair. A smaller grid gives a tighter bound per pair; the default grid has 14.

Example:
    >>> round(epsilon_lower_bound(m=1000, r=100, v=100, delta=0.0, beta=0.05), 3)
    3.493
    >>> epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5, beta=0.05)
    0.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # r / m tried (with k- = 0, and with k+ = k-)


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[W >= v] bound for an (ε, δ)-DP run: m canaries, r guesses, v correct (their Algorithm 2)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    return min(1.0, tail + 2.0 * m * delta * _alpha(r=r, v=v, p=p))


ALPHA_WINDOW = 1024  # i <= this first: beyond it every ratio is at most 1 / ALPHA_WINDOW


def _alpha(*, r: int, v: int, p: float) -> float:
    """max_{i=1..v} P[v - i <= Binomial(r, p) < v] / i: pmf at v-1, v-2, ..., cumulated, over i.

    The cumulated pmf is at most 1, so once the first ALPHA_WINDOW ratios reach 1 / ALPHA_WINDOW no later
    one can beat them: the full length v is computed only when they do not (exact either way)."""
    def ratios_max(length: int) -> float:
        pmf = stats.binom.pmf(np.arange(v - 1, v - 1 - length, -1), r, p)  # [length]
        return float(np.max(np.cumsum(pmf) / np.arange(1, length + 1)))

    alpha = ratios_max(min(v, ALPHA_WINDOW))
    return alpha if v <= ALPHA_WINDOW or alpha >= 1.0 / ALPHA_WINDOW else ratios_max(v)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, beta: float, tol: float = 1e-6) -> float:
    """The largest ε whose (ε, δ)-DP null hypothesis has p-value < ``beta`` (0 when none is rejected)."""
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0  # invariant: p(low) < beta <= p(high)
    while p_value(m=m, r=r, v=v, epsilon=high, delta=delta) < beta:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    while high - low > tol:
        mid = (low + high) / 2
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < beta:
            low = mid
        else:
            high = mid
    return low


def default_guess_grid(m: int) -> list[tuple[int, int]]:
    """(k+, k-) pairs: r = f·m for f in ``GUESS_FRACTIONS``, all "in" guesses or split evenly."""
    grid: list[tuple[int, int]] = []
    for fraction in GUESS_FRACTIONS:
        r = max(1, round(fraction * m))
        for pair in ((r, 0), (r - r // 2, r // 2)):
            if pair not in grid and sum(pair) <= m:
                grid.append(pair)
    return grid


@dataclass
class AuditBound:
    """The best (k+, k-) of the grid and its bound; ``table`` has every pair tried."""

    epsilon_lower_bound: float
    confidence: float
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    m: int
    delta: float
    pairs_tried: int
    table: list[dict] = field(default_factory=list)


def audit_scores(scores, included, *, delta: float, confidence: float = 0.95,
                 grid: list[tuple[int, int]] | None = None) -> AuditBound:
    """ε lower bound at ``confidence`` from canary ``scores`` [m] (higher = "in") and truth ``included`` [m].

    Example:
        >>> rng = np.random.default_rng(0)
        >>> truth = rng.random(1000) < 0.5
        >>> audit_scores(truth + 0.0, truth, delta=1e-5).epsilon_lower_bound > 3  # perfect scores
        True
        >>> audit_scores(rng.random(1000), truth, delta=1e-5).epsilon_lower_bound  # chance
        0.0
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    if scores.shape != included.shape or scores.size == 0:
        raise ValueError(f"scores and included must be [m] with m >= 1, got {scores.shape} and {included.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    m = scores.size
    grid = grid or default_guess_grid(m)
    beta = (1 - confidence) / len(grid)
    # Stable order: ties broken by index, so the guesses are a function of the scores alone.
    order = np.argsort(-scores, kind="stable")
    truth = included[order]
    best, table = None, []
    for k_plus, k_minus in grid:
        if k_plus + k_minus > m or k_plus < 0 or k_minus < 0:
            raise ValueError(f"guess pair ({k_plus}, {k_minus}) needs k+ + k- <= m = {m}")
        correct = int(truth[:k_plus].sum()) + int((~truth[m - k_minus:]).sum() if k_minus else 0)
        r = k_plus + k_minus
        bound = epsilon_lower_bound(m=m, r=r, v=correct, delta=delta, beta=beta)
        table.append({"k_plus": k_plus, "k_minus": k_minus, "correct": correct, "epsilon_lower_bound": bound})
        if best is None or bound > best["epsilon_lower_bound"]:
            best = table[-1]
    return AuditBound(epsilon_lower_bound=best["epsilon_lower_bound"], confidence=confidence,
                      k_plus=best["k_plus"], k_minus=best["k_minus"], guesses=best["k_plus"] + best["k_minus"],
                      correct=best["correct"], m=m, delta=delta, pairs_tried=len(grid), table=table)

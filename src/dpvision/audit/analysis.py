"""From canary scores to the audit's two lower bounds and its verdict (no engine, no training).

The auditor ranks the m canaries by score, guesses "in" for the k+ highest and
"out" for the k- lowest, abstains on the rest, and counts the correct guesses
for every pair of a fixed grid (:func:`dpvision.audit.stats.default_guess_grid`).
Two analyses turn the counts into lower bounds on ε:

* ``steinke``: the (ε, δ)-DP test of Steinke, Nasr and Jagielski (2023), valid
  for any mechanism;
* ``fdp``: the f-DP test of Mahloujifar et al. (2025) against DP-SGD's own
  trade-off curves at the claimed sample rate and step count
  (:mod:`dpvision.audit.fdp`), tighter.

Multiple comparisons: every pair of the grid under both analyses is one
hypothesis test, so each runs at level (1 - confidence) / (2 J) (Bonferroni over
the J pairs and the two analyses). The larger of the two bounds therefore still
holds at the stated confidence, and so does the verdict: **FAIL** when either
bound exceeds the claimed ε (the f-DP one rejects the claimed curve itself).

Example:
    >>> rng = np.random.default_rng(0)
    >>> truth = rng.random(2000) < 0.5
    >>> result = analyse(truth + 0.0, truth, delta=1e-5, sample_rate=0.1, noise_multiplier=1.0, steps=40)
    >>> result.verdict, result.epsilon_lower_bound > 3  # perfect guesses: the claimed curve is rejected
    ('FAIL', True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpvision.audit.fdp import dpsgd_epsilon, fdp_lower_bound, rejecting_pair
from dpvision.audit.stats import audit_scores, default_guess_grid

ANALYSES = ("steinke", "fdp")


@dataclass
class AuditAnalysis:
    """Both bounds (the larger is the result), the claimed curve's ε (PLD) and the verdict."""

    epsilon_lower_bound: float  # max of the two
    analysis: str  # which of ANALYSES gave it
    steinke: dict
    fdp: dict
    claimed_epsilon_pld: float  # the ε of the claimed DP-SGD curve (σ, q, T) at δ: what the f-DP bound meets
    confidence: float
    verdict: str  # "PASS" or "FAIL"
    guess_table: list[dict]


def _counts(scores: np.ndarray, included: np.ndarray, grid: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    order = np.argsort(-scores, kind="stable")  # ties broken by index: guesses depend on the scores alone
    truth = included[order]
    m = len(truth)
    return [(kp, km, int(truth[:kp].sum()) + (int((~truth[m - km:]).sum()) if km else 0)) for kp, km in grid]


def analyse(scores, included, *, delta: float, sample_rate: float, noise_multiplier: float, steps: int,
            claimed_epsilon: float | None = None, confidence: float = 0.95) -> AuditAnalysis:
    """Both bounds for ``scores`` [m] (higher = "in") and the truth ``included`` [m] of a run claiming
    DP-SGD at (``noise_multiplier``, ``sample_rate``, ``steps``); ``claimed_epsilon`` is the primary
    accountant's ε (default: the PLD ε of that curve)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    grid = default_guess_grid(len(scores))
    beta = (1 - confidence) / (2 * len(grid))
    steinke = audit_scores(scores, included, delta=delta, confidence=1 - beta * len(grid), grid=grid)
    counts = _counts(scores, included, grid)
    m = len(scores)
    fdp = fdp_lower_bound(counts, m=m, sample_rate=sample_rate, steps=steps, delta=delta, beta=beta)
    claimed_pld = (float("inf") if noise_multiplier <= 0 else
                   dpsgd_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                                 delta=delta))
    claimed = claimed_pld if claimed_epsilon is None else claimed_epsilon
    fdp_fails = noise_multiplier > 0 and rejecting_pair(  # the claimed curve itself rejected
        counts, m=m, sample_rate=sample_rate, steps=steps, noise_multiplier=noise_multiplier, beta=beta) is not None
    fails = steinke.epsilon_lower_bound > claimed or fdp_fails
    best = "fdp" if fdp.epsilon_lower_bound >= steinke.epsilon_lower_bound else "steinke"
    return AuditAnalysis(
        epsilon_lower_bound=max(fdp.epsilon_lower_bound, steinke.epsilon_lower_bound), analysis=best,
        steinke={"epsilon_lower_bound": steinke.epsilon_lower_bound, "k_plus": steinke.k_plus,
                 "k_minus": steinke.k_minus, "guesses": steinke.guesses, "correct": steinke.correct},
        fdp={"epsilon_lower_bound": fdp.epsilon_lower_bound, "noise_multiplier_rejected": fdp.noise_multiplier,
             "at_floor": fdp.at_floor, "k_plus": fdp.k_plus, "k_minus": fdp.k_minus,
             "guesses": fdp.k_plus + fdp.k_minus, "correct": fdp.correct},
        claimed_epsilon_pld=claimed_pld, confidence=confidence, verdict="FAIL" if fails else "PASS",
        guess_table=[{"k_plus": kp, "k_minus": km, "correct": c} for kp, km, c in counts])

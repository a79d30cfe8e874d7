"""Scoring the canaries and choosing the guesses BEFORE the run (from the claim alone).

**Scores.** A white-box canary i is one coordinate of the update: at step t the auditor sees
x_{t,i} = b_{t,i} + N(0, σ²) in units of one clipped canary (b = 1 when the canary was sampled,
which needs S_i = in). Under the all-iterates threat model the Neyman-Pearson test of one canary
is the likelihood ratio of the claimed mechanism (Poisson sampling at q, Gaussian noise σ),

    score_i = Σ_t log(1 - q + q exp((x_{t,i} - 1/2) / σ²))      (``steps``)

which at q = 1 is (Σ_t x_{t,i} - T/2) / σ², the plain sum (the only case where the sum is
optimal). ``final`` is Σ_t x_{t,i}: the canary's coordinate of θ_0 - θ_T (last iterate only).

**Guesses.** The auditor guesses "in" for the k+ highest scores and "out" for the k- lowest and
abstains on the rest. Choosing (k+, k-) after looking at which guesses were right would be a
multiple comparison; choosing it from a simulation of the *claimed* mechanism (fixed seed, never
the run's S) is not, so every analysis tests ONE pair at the full level (1 - confidence) / J,
J = the number of analyses. :func:`plan_guesses` simulates the claim's scores, takes the
expected number of correct guesses of each candidate pair and keeps the pair that gives each
analysis its best bound. A broken run is still judged on the pair planned for the claim: a bug
cannot steer the guesses.

Example:
    >>> x = np.array([[1.2, 0.1], [0.9, -0.3]])  # [T, m]: canary 0 sampled twice
    >>> s = canary_scores(x, score="steps", sample_rate=1.0, noise_multiplier=1.0)
    >>> bool(s[0] > s[1]), float(s[0])  # q = 1: (1.2 + 0.9 - 1) / 1
    (True, 1.1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dpvision.audit.fdp import fdp_lower_bound
from dpvision.audit.stats import epsilon_lower_bound

SCORES = ("steps", "final")
CANDIDATE_FRACTIONS = tuple(float(f) for f in np.geomspace(0.002, 0.3, 9))  # guesses / m tried by the plan
PLAN_REPEATS = 4  # simulated runs of the claim averaged into the expected counts
PLAN_SEED = 20231  # the plan's own generator: the run's S never enters it
# The sampling check's "out" guesses: the lowest 2% of m. Fixed in advance (the claim has no violation to plan
# for); simulated shuffled batches and a doubled sample rate are most visible there (docs/privacy.md).
SAMPLING_FRACTION = 0.02
PLAN_TOLERANCE = 1e-3  # the plan's Steinke bounds only rank pairs: a coarser bisection than the result's 1e-6
SCORE_SIGMA_FLOOR = 0.5  # the likelihood ratio's σ when the run claims less noise (σ = 0: non-private reference)


def canary_scores(x: np.ndarray, *, score: str, sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Scores [m] (higher = "in") from the canaries' observations ``x`` [T, m] (units of one clipped canary)."""
    x = np.asarray(x, dtype=np.float64)
    if score == "final":
        return x.sum(0)
    if score != "steps":
        raise ValueError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    z = (x - 0.5) / max(noise_multiplier, SCORE_SIGMA_FLOOR)**2  # [T, m] Gaussian log-likelihood ratio of "sampled"
    if sample_rate >= 1:
        return z.sum(0)
    return np.logaddexp(math.log1p(-sample_rate), z + math.log(sample_rate)).sum(0)


def simulate_observations(rng: np.random.Generator, *, m: int, sample_rate: float, noise_multiplier: float,
                          steps: int) -> tuple[np.ndarray, np.ndarray]:
    """One run of the claimed mechanism on m canaries: observations [T, m] and the truth [m]."""
    truth = rng.random(m) < 0.5
    sampled = (rng.random((steps, m)) < sample_rate) & truth  # [T, m]
    return sampled + noise_multiplier * rng.standard_normal((steps, m)), truth


def guess_counts(scores: np.ndarray, truth: np.ndarray, pairs) -> list[tuple[int, int, int]]:
    """(k+, k-, correct) for each pair: "in" for the k+ highest scores, "out" for the k- lowest."""
    order = np.argsort(-np.asarray(scores), kind="stable")  # ties broken by index: a function of the scores
    ranked = np.asarray(truth, dtype=bool)[order]
    m = len(ranked)
    return [(kp, km, int(ranked[:kp].sum()) + (int((~ranked[m - km:]).sum()) if km else 0)) for kp, km in pairs]


def candidate_pairs(m: int) -> list[tuple[int, int]]:
    """For each fraction: all "in", all "out" and an even split."""
    pairs: list[tuple[int, int]] = []
    for fraction in CANDIDATE_FRACTIONS:
        r = max(2, round(fraction * m))
        for pair in ((r - r // 2, r // 2), (r, 0), (0, r)):
            if pair not in pairs and sum(pair) <= m:
                pairs.append(pair)
    return pairs


@dataclass(frozen=True)
class GuessPlan:
    """The pair each analysis tests, with the counts and bounds the claim itself is expected to give."""

    steinke: tuple[int, int]
    fdp: tuple[int, int]
    sampling: int  # k- of the sampling check ("out" guesses only); 0: no check (q = 1)
    expected_steinke: float
    expected_fdp: float


@lru_cache(maxsize=32)
def plan_guesses(*, m: int, sample_rate: float, noise_multiplier: float, steps: int, score: str, delta: float,
                 beta: float) -> GuessPlan:
    """The guesses for a run claiming DP-SGD at (σ, q, T), each analysis tested at level ``beta``."""
    rng = np.random.default_rng(PLAN_SEED)
    pairs = candidate_pairs(m)
    expected = np.zeros(len(pairs))
    for _ in range(PLAN_REPEATS):
        x, truth = simulate_observations(rng, m=m, sample_rate=sample_rate, steps=steps,
                                         noise_multiplier=max(noise_multiplier, SCORE_SIGMA_FLOOR))
        scores = canary_scores(x, score=score, sample_rate=sample_rate, noise_multiplier=noise_multiplier)
        expected += [c for *_, c in guess_counts(scores, truth, pairs)]
    counts = [(kp, km, int(c / PLAN_REPEATS)) for (kp, km), c in zip(pairs, expected)]
    steinke = [epsilon_lower_bound(m=m, r=kp + km, v=c, delta=delta, beta=beta, tol=PLAN_TOLERANCE)
               for kp, km, c in counts]
    fdp = [fdp_lower_bound([pc], m=m, sample_rate=sample_rate, steps=steps, delta=delta, beta=beta,
                           coarse=True).epsilon_lower_bound for pc in counts]
    s, f = int(np.argmax(steinke)), int(np.argmax(fdp))
    sampling = max(1, round(SAMPLING_FRACTION * m)) if sample_rate < 1 else 0
    return GuessPlan(steinke=pairs[s], fdp=pairs[f], sampling=sampling,
                     expected_steinke=steinke[s], expected_fdp=fdp[f])

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
multiple comparison; choosing it from the *claimed* mechanism alone (never the run's S) is not, so
every analysis tests ONE pair at its full level (:meth:`dpvision.audit.analysis.Claim.levels`).
:func:`plan_guesses` takes the expected number of correct guesses of each candidate pair under the
claim (closed form at q = 1, a simulation with a fixed seed otherwise: :func:`expected_counts`) and
keeps the pair that gives each analysis its best bound. A broken run is still judged on the pair
planned for the claim: a bug cannot steer the guesses.

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
from scipy import optimize

from dpvision.audit.fdp import fdp_lower_bound
from dpvision.audit.stats import epsilon_lower_bound

SCORES = ("steps", "final")
CANDIDATE_FRACTIONS = tuple(float(f) for f in np.geomspace(0.002, 0.3, 9))  # guesses / m tried by the plan
PLAN_REPEATS = 4  # simulated runs of the claim averaged into the expected counts (q < 1: [T, m] draws each)
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


def expected_counts(*, m: int, sample_rate: float, noise_multiplier: float, steps: int, score: str,
                    pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """(k+, k-, expected correct) of each pair for a run of the claim.

    At q = 1 both scores rank the canaries by Σ_t x_{t,i}: N(T, T σ²) for an included canary, N(0, T σ²)
    for a left-out one, each with probability 1/2, so the expected counts have a closed form (the top k+
    are those above the threshold the mixture exceeds with probability k+ / m): no simulation, hence no
    winner's curse from picking the luckiest of 27 noisy estimates. Otherwise PLAN_REPEATS simulated runs
    (the plan's own seed) are averaged."""
    sigma = max(noise_multiplier, SCORE_SIGMA_FLOOR)
    if sample_rate >= 1:
        return [(kp, km, int(_full_batch_correct(m, kp, km, steps, sigma))) for kp, km in pairs]
    rng = np.random.default_rng(PLAN_SEED)
    total = np.zeros(len(pairs))
    for _ in range(PLAN_REPEATS):
        x, truth = simulate_observations(rng, m=m, sample_rate=sample_rate, steps=steps, noise_multiplier=sigma)
        scores = canary_scores(x, score=score, sample_rate=sample_rate, noise_multiplier=noise_multiplier)
        total += [c for *_, c in guess_counts(scores, truth, pairs)]
    return [(kp, km, int(c / PLAN_REPEATS)) for (kp, km), c in zip(pairs, total)]


def _full_batch_correct(m: int, k_plus: int, k_minus: int, steps: int, sigma: float) -> float:
    """Expected correct guesses at q = 1 (m large): in-scores N(T, T σ²), out-scores N(0, T σ²), half each."""
    sd, correct = sigma * math.sqrt(steps), 0.0

    def above(u: float, mean: float) -> float:  # P[N(mean, sd²) > u]
        return 0.5 * math.erfc((u - mean) / (sd * math.sqrt(2)))

    low, high = -40 * sd, steps + 40 * sd
    if k_plus:  # threshold t: P[score > t] = k+ / m; the included ones above it are right
        t = optimize.brentq(lambda u: (above(u, steps) + above(u, 0.0)) / 2 - k_plus / m, low, high)
        correct += m * above(t, steps) / 2
    if k_minus:  # threshold t: P[score < t] = k- / m; the left-out ones below it are right
        t = optimize.brentq(lambda u: (2 - above(u, steps) - above(u, 0.0)) / 2 - k_minus / m, low, high)
        correct += m * (1 - above(t, 0.0)) / 2
    return correct


@lru_cache(maxsize=32)
def plan_guesses(*, m: int, sample_rate: float, noise_multiplier: float, steps: int, score: str, delta: float,
                 steinke_level: float, fdp_level: float) -> GuessPlan:
    """The guesses for a run claiming DP-SGD at (σ, q, T), each analysis tested at its own level.

    Each pair is scored by its bound at its expected count; the f-DP bounds use the analysis's own fine
    lattice at q = 1 (exact curves, cheap) and the coarse one otherwise (PLDs)."""
    pairs = candidate_pairs(m)
    counts = expected_counts(m=m, sample_rate=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                             score=score, pairs=pairs)
    steinke = [epsilon_lower_bound(m=m, r=kp + km, v=c, delta=delta, beta=steinke_level, tol=PLAN_TOLERANCE)
               for kp, km, c in counts]
    fdp = [fdp_lower_bound([pc], m=m, sample_rate=sample_rate, steps=steps, delta=delta, beta=fdp_level,
                           coarse=sample_rate < 1).epsilon_lower_bound for pc in counts]
    s, f = int(np.argmax(steinke)), int(np.argmax(fdp))
    sampling = max(1, round(SAMPLING_FRACTION * m)) if sample_rate < 1 else 0
    return GuessPlan(steinke=pairs[s], fdp=pairs[f], sampling=sampling,
                     expected_steinke=steinke[s], expected_fdp=fdp[f])

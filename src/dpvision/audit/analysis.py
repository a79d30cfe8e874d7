"""From canary scores to the audit's lower bounds and its verdict (no engine, no training).

The auditor ranks the m canaries by score, guesses "in" for the k+ highest and "out" for the k-
lowest, and abstains on the rest. Each analysis tests ONE (k+, k-) pair, planned before the run
from the claim alone (:func:`dpvision.audit.design.plan_guesses`):

* ``steinke``: the (ε, δ)-DP test of Steinke, Nasr and Jagielski (2023), valid for any mechanism;
* ``fdp``: the f-DP test of Mahloujifar et al. (2025) against DP-SGD's own trade-off curves at the
  claimed sample rate and step count (:mod:`dpvision.audit.fdp`), usually tighter;
* ``sampling`` (only when q < 1): the "out" guesses alone against the claim's bounded direction.
  An included canary is never sampled with probability (1 - q)^T, and then the run is exactly the
  run without it, so P_out <= e^ε_out P_in + δ with ε_out <= T log(1 / (1 - q)) whatever the noise
  (:func:`dpvision.audit.fdp.dpsgd_out_epsilon`). Steinke et al.'s argument needs only the direction
  each guess uses, so "out" guesses are tested at (ε_out, δ / 10): a run that does not sample the
  way its accountant was told (fixed-size batches, a larger q) is caught even when its two-sided
  ε is no larger than the claim.

* ``checks`` (white-box runs with noise): the noise and clipping checks of :mod:`dpvision.audit.checks`
  on the canaries' observations (too little spread in the left-out canaries; more contribution from
  the included ones than one clipped canary per sampled step).

Multiple comparisons (Bonferroni): the two mechanism checks run at CHECK_SHARE (1 - confidence) each
and the analyses share the rest by ANALYSIS_WEIGHTS (Steinke 1 : f-DP 3, and sampling 2 when q < 1), all
fixed in advance, so a correct run FAILs with probability at most 1 - confidence in all, and the larger
of the two bounds holds at the stated confidence. **FAIL** when Steinke et al.'s bound exceeds the claimed ε,
when the f-DP test rejects the claimed curve itself, when the sampling check rejects Poisson sampling at
the claimed q, or when a mechanism check rejects the claimed noise or clipping.

Example:
    >>> rng = np.random.default_rng(0)
    >>> truth = rng.random(2000) < 0.5
    >>> claim = Claim(noise_multiplier=1.0, sample_rate=0.1, steps=40, delta=1e-5)
    >>> result = analyse(truth + 0.0, truth, claim)
    >>> result.verdict, result.epsilon_lower_bound > 3  # perfect guesses: the claimed curve is rejected
    ('FAIL', True)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from dpvision.audit.checks import mechanism_checks
from dpvision.audit.design import GuessPlan, candidate_pairs, guess_counts, plan_guesses
from dpvision.audit.fdp import dpsgd_epsilon, dpsgd_out_epsilon, fdp_lower_bound, rejecting_pair
from dpvision.audit.stats import epsilon_lower_bound, p_value

ANALYSES = ("steinke", "fdp", "sampling")
# Each mechanism check's share of 1 - confidence. They look for effects many standard deviations wide
# (half the noise, twice the contribution), so a small level costs them nothing and the ε bounds keep 98%.
CHECK_SHARE = 0.01
# How the analyses split the rest (fixed in advance). The f-DP bound is the result nearly always, so it gets
# three times Steinke et al.'s share (+3% on the full-size bounds in simulation, docs/privacy.md); the sampling
# check keeps a third when it runs (q < 1), as with an equal split.
ANALYSIS_WEIGHTS = {"steinke": 1.0, "fdp": 3.0, "sampling": 2.0}


@dataclass(frozen=True)
class Levels:
    """The level of each test: a correct run fails one of them with probability at most their sum."""

    steinke: float
    fdp: float
    sampling: float  # 0: no sampling check (q = 1)
    check: float  # each of the two mechanism checks; 0: none (no observations, or no noise claimed)

    def total(self) -> float:
        return self.steinke + self.fdp + self.sampling + 2 * self.check


@dataclass(frozen=True)
class Claim:
    """What the accountant was told: DP-SGD at σ (noise multiplier), Poisson q, T steps; and δ."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float

    def levels(self, confidence: float, checks: bool = False) -> Levels:
        """Bonferroni over every test that runs: with ``checks`` (white-box observations), the noise and
        clipping checks get CHECK_SHARE of 1 - confidence each; the analyses share the rest by
        ANALYSIS_WEIGHTS (the sampling check only when q < 1)."""
        alpha = 1 - confidence
        check = CHECK_SHARE * alpha if checks else 0.0
        weights = {**ANALYSIS_WEIGHTS, "sampling": ANALYSIS_WEIGHTS["sampling"] if self.sample_rate < 1 else 0.0}
        unit = (alpha - 2 * check) / sum(weights.values())
        return Levels(**{name: unit * weight for name, weight in weights.items()}, check=check)


@dataclass
class AuditAnalysis:
    """Both bounds (the larger is the result), the sampling check, the claimed curve's ε (PLD), the verdict."""

    epsilon_lower_bound: float  # max of the two bounds
    analysis: str  # "steinke" or "fdp": which gave it
    steinke: dict
    fdp: dict
    sampling: dict
    checks: dict  # {"noise": ..., "clipping": ...} (white-box runs with noise), else {}
    claimed_epsilon_pld: float  # the ε of the claimed DP-SGD curve (σ, q, T) at δ: what the f-DP bound meets
    confidence: float
    verdict: str  # "PASS" or "FAIL"
    plan: dict  # the planned pairs and the bounds the claim itself is expected to give
    guess_table: list[dict]  # every candidate pair's count (information only: not tested)


def _fdp(counts: tuple[int, int, int], claim: Claim, m: int, beta: float) -> tuple[dict, bool]:
    bound = fdp_lower_bound([counts], m=m, sample_rate=claim.sample_rate, steps=claim.steps, delta=claim.delta,
                            beta=beta)
    rejects = claim.noise_multiplier > 0 and rejecting_pair(  # the claimed curve itself rejected
        [counts], m=m, sample_rate=claim.sample_rate, steps=claim.steps, noise_multiplier=claim.noise_multiplier,
        beta=beta) is not None
    return {"epsilon_lower_bound": bound.epsilon_lower_bound, "noise_multiplier_rejected": bound.noise_multiplier,
            "at_floor": bound.at_floor, "k_plus": counts[0], "k_minus": counts[1], "guesses": counts[0] + counts[1],
            "correct": counts[2], "level": beta, "rejects_claim": bool(rejects)}, bool(rejects)


def _sampling(scores, included, claim: Claim, k_minus: int, beta: float) -> dict:
    """The "out" guesses against the claim's bounded direction, (ε_out, δ / 10): Steinke et al.'s test, one side."""
    if not k_minus:
        return {"k_minus": 0, "correct": 0, "epsilon_out": math.inf, "ceiling": 1.0, "p_value": 1.0, "level": beta,
                "rejects_claim": False}
    correct = guess_counts(scores, included, [(0, k_minus)])[0][2]
    delta = claim.delta / 10  # fixed in advance: smaller than the claim's δ, so the δ term stays small
    eps_out = dpsgd_out_epsilon(noise_multiplier=claim.noise_multiplier, sample_rate=claim.sample_rate,
                                steps=claim.steps, delta=delta)
    p = p_value(m=len(scores), r=k_minus, v=correct, epsilon=eps_out, delta=delta)
    return {"k_minus": k_minus, "correct": correct, "epsilon_out": eps_out, "ceiling": 1 / (1 + math.exp(-eps_out)),
            "p_value": p, "level": beta, "rejects_claim": bool(p < beta)}


def analyse(scores, included, claim: Claim, *, score: str = "steps", claimed_epsilon: float | None = None,
            confidence: float = 0.95, plan: GuessPlan | None = None,
            observations: np.ndarray | None = None) -> AuditAnalysis:
    """Both bounds and the sampling check for ``scores`` [m] (higher = "in", made by ``score``) and the truth
    ``included`` [m] of a run making ``claim``; ``claimed_epsilon`` is the primary accountant's ε (default:
    the claimed curve's ε). ``plan``: the guesses (default: planned from the claim).
    ``observations`` [T, m] (white-box, units of one clipped canary): also run the mechanism checks
    (:mod:`dpvision.audit.checks`; only when the claim has noise)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    included = np.asarray(included, dtype=bool).reshape(-1)
    if scores.shape != included.shape or scores.size < 2 or not np.all(np.isfinite(scores)):
        raise ValueError(f"scores and included must be [m] with m >= 2 and finite scores, got {scores.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if observations is not None and (np.ndim(observations) != 2 or np.shape(observations)[1] != scores.size):
        raise ValueError(f"observations must be [T, m] with m = {scores.size}, got {np.shape(observations)}")
    run_checks = observations is not None and claim.noise_multiplier > 0
    m, levels = scores.size, claim.levels(confidence, checks=run_checks)
    plan = plan or plan_guesses(m=m, sample_rate=claim.sample_rate, noise_multiplier=claim.noise_multiplier,
                                steps=claim.steps, score=score, delta=claim.delta, steinke_level=levels.steinke,
                                fdp_level=levels.fdp)
    kp, km, correct = guess_counts(scores, included, [plan.steinke])[0]
    steinke = {"epsilon_lower_bound": epsilon_lower_bound(m=m, r=kp + km, v=correct, delta=claim.delta,
                                                          beta=levels.steinke),
               "k_plus": kp, "k_minus": km, "guesses": kp + km, "correct": correct, "level": levels.steinke}
    fdp, fdp_fails = _fdp(guess_counts(scores, included, [plan.fdp])[0], claim, m, levels.fdp)
    sampling = _sampling(scores, included, claim, plan.sampling, levels.sampling)
    claimed_pld = (float("inf") if claim.noise_multiplier <= 0 else
                   dpsgd_epsilon(noise_multiplier=claim.noise_multiplier, sample_rate=claim.sample_rate,
                                 steps=claim.steps, delta=claim.delta))
    claimed = claimed_pld if claimed_epsilon is None else claimed_epsilon
    checks = (mechanism_checks(observations, included, score=score, sample_rate=claim.sample_rate,
                               noise_multiplier=claim.noise_multiplier, level=levels.check) if run_checks else {})
    fails = (steinke["epsilon_lower_bound"] > claimed or fdp_fails or sampling["rejects_claim"]
             or any(check["rejects_claim"] for check in checks.values()))
    best = "fdp" if fdp["epsilon_lower_bound"] >= steinke["epsilon_lower_bound"] else "steinke"
    return AuditAnalysis(
        epsilon_lower_bound=max(fdp["epsilon_lower_bound"], steinke["epsilon_lower_bound"]), analysis=best,
        steinke=steinke, fdp=fdp, sampling=sampling, checks=checks, claimed_epsilon_pld=claimed_pld,
        confidence=confidence,
        verdict="FAIL" if fails else "PASS",
        plan={"steinke": list(plan.steinke), "fdp": list(plan.fdp), "sampling_k_minus": plan.sampling,
              "expected_steinke": plan.expected_steinke, "expected_fdp": plan.expected_fdp,
              "levels": asdict(levels)},
        guess_table=[{"k_plus": a, "k_minus": b, "correct": c}
                     for a, b, c in guess_counts(scores, included, candidate_pairs(m))])

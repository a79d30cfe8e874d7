"""Mechanism checks: the white-box canaries' noise and contributions against the claim (one-sided tests).

The auditor knows which canaries it inserted. In units of one clipped canary (C), the claim says a
canary's coordinate of step t's update is x_{t,i} = b_{t,i} + N(0, σ²), with b_{t,i} = 0 for a
canary left out (S_i = out) and, for an included one, b_{t,i} = its clipped contribution (at most 1:
every clipping rule keeps an example's row within C) at the steps where Poisson sampling at q chose
it (independently, probability q). Two consequences are tested directly:

* **noise**: the left-out canaries' coordinates are exactly N(0, σ²), independent (fresh noise per
  coordinate and step). Under the claim Σ x² / σ² is χ² with one degree of freedom per value; the
  check rejects when it is too SMALL (p = the χ² CDF): less noise than claimed. Rounding in the
  engine (float32) only adds spread, so it cannot make a correct run fail here.
* **clipping**: the included canaries' raw rows have norm ``RAW_NORM`` C (4C), so clipping has to act.
  Their total S = Σ_{t, i in} x_{t,i} over n = T · m_in values is, under the claim, at most
  (1 + ``ROUNDING_SLACK``) · Binomial(n, q) + N(0, n σ²) in distribution; the check rejects when S is
  too LARGE (p = that upper tail, computed exactly by summing over the binomial). It flags more than
  C per sampled step (clipping off, clipping at 2C) and canaries sampled more often than q (the
  accountant told a smaller q); fixed-size batches keep the mean and are the sampling check's job.

Under ``score="final"`` (the last iterate only) the auditor sees each canary's sum over steps, so the
noise check uses those sums (variance T σ²); the clipping check's total is the same.

What they do NOT show: both look at the audit coordinates only; a bug that treats the model's own
parameters differently (noise added to some tensors only) is outside their view, and a run whose
noise is right but whose accountant is wrong (a wrong T or δ) is the ε bounds' job.

Example:
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 4000))  # [T, m]: σ = 1, nothing included
    >>> noise_check(x * 0.5, noise_multiplier=1.0, level=0.001)["rejects_claim"]  # half the noise
    True
    >>> noise_check(x, noise_multiplier=1.0, level=0.001)["rejects_claim"]
    False
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

ROUNDING_SLACK = 1e-3  # a clipped canary may add up to 1.001 C per sampled step: float32 rounding, never a bug
BINOMIAL_SPAN = 40.0  # the clipping check sums the binomial over mean ± 40 sd; the rest (< 1e-300) counts as 1


def noise_check(values: np.ndarray, *, noise_multiplier: float, level: float, steps_summed: int = 1) -> dict:
    """Left-out canaries' values (any shape; each N(0, steps_summed σ²) under the claim): too little spread?"""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    variance = steps_summed * noise_multiplier**2
    df = values.size
    if df == 0 or variance <= 0:
        return {"values": df, "spread_ratio": math.nan, "chi2": 0.0, "z": math.nan, "p_value": 1.0, "level": level,
                "rejects_claim": False}
    statistic = float(np.dot(values, values) / variance)
    p = float(stats.chi2.cdf(statistic, df))  # P[χ²_df <= statistic]: small when the noise is too small
    z = (statistic - df) / math.sqrt(2 * df)  # standard deviations from the claim (information: p can underflow)
    return {"values": df, "spread_ratio": math.sqrt(statistic / df), "chi2": statistic, "z": z, "p_value": p,
            "level": level, "rejects_claim": bool(p < level)}


def contribution_p_value(total: float, *, count: int, sample_rate: float, noise_multiplier: float) -> float:
    """P[(1 + slack) Binomial(count, q) + N(0, count σ²) >= total]: the claim's largest upper tail."""
    cap = 1.0 + ROUNDING_SLACK
    sd = noise_multiplier * math.sqrt(count)
    outside = 0.0  # binomial mass beyond the span: counted as a certain exceedance
    if sample_rate >= 1:
        ks, weights = np.array([count]), np.array([1.0])
    else:
        spread = BINOMIAL_SPAN * math.sqrt(count * sample_rate * (1 - sample_rate)) + 1
        mean = count * sample_rate
        ks = np.arange(max(0, math.floor(mean - spread)), min(count, math.ceil(mean + spread)) + 1)  # [K]
        weights = stats.binom.pmf(ks, count, sample_rate)  # [K]
        outside = float(stats.binom.cdf(ks[0] - 1, count, sample_rate) + stats.binom.sf(ks[-1], count, sample_rate))
    if sd > 0:
        tails = stats.norm.sf((total - cap * ks) / sd)  # [K]
    else:
        tails = (cap * ks >= total).astype(np.float64)
    return float(min(1.0, np.dot(weights, tails) + outside))


def clipping_check(values: np.ndarray, *, steps: int, sample_rate: float, noise_multiplier: float,
                   level: float) -> dict:
    """Included canaries' values [T, m_in] (or their sums over T steps): more contribution than the claim allows?"""
    values = np.asarray(values, dtype=np.float64)
    count = steps * (values.shape[-1] if values.ndim else 0)
    if count == 0:
        return {"values": 0, "contribution_ratio": math.nan, "z": math.nan, "p_value": 1.0, "level": level,
                "rejects_claim": False}
    total = float(values.sum())
    p = contribution_p_value(total, count=count, sample_rate=sample_rate, noise_multiplier=noise_multiplier)
    spread = math.sqrt(count * (noise_multiplier**2 + sample_rate * (1 - sample_rate)))  # the claim's sd of the total
    z = (total - count * sample_rate) / spread if spread > 0 else math.nan
    return {"values": count, "contribution_ratio": total / (count * sample_rate), "z": z, "p_value": p,
            "level": level, "rejects_claim": bool(p < level)}


def mechanism_checks(x: np.ndarray, included: np.ndarray, *, score: str, sample_rate: float,
                     noise_multiplier: float, level: float) -> dict:
    """Both checks on the observations ``x`` [T, m] (units of one clipped canary) and the truth ``included`` [m]."""
    x = np.asarray(x, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    steps = x.shape[0]
    out = x[:, ~included]  # [T, m_out]
    if score == "final":  # the last iterate shows each canary's sum over the steps only
        noise = noise_check(out.sum(0), noise_multiplier=noise_multiplier, level=level, steps_summed=steps)
    else:
        noise = noise_check(out, noise_multiplier=noise_multiplier, level=level)
    clipping = clipping_check(x[:, included], steps=steps, sample_rate=sample_rate,
                              noise_multiplier=noise_multiplier, level=level)
    return {"noise": noise, "clipping": clipping}

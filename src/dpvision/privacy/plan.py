"""The run's plan: every number derived from the settings and the data, computed once.

A :class:`Plan` is made once per run (by the job, the audit or a benchmark) from
the N examples actually trained on, and handed to everything that needs one of
its numbers: the engines (q, steps, E[B], σ, C), the ledger and the accountants
(σ, q, δ), the learning-rate schedule (total and warm-up steps) and the run
folder (``config.yaml``'s ``resolved`` section). Nothing downstream re-derives q
or the epoch length.

Sampling convention (Opacus's ``DPDataLoader``): with N examples and batch size B,
under DP every step includes each example independently with probability
q = 1 / ceil(N / B), an epoch is int(1 / q) steps (Opacus's count; one short of
ceil(N / B) for some m, see :func:`~dpvision.privacy.accounting.steps_per_epoch`),
and the noisy sum is divided by E[B] = N // ceil(N / B). Without DP an epoch is
ceil(N / B) shuffled batches (the last one smaller).

Example:
    >>> plan = make_plan(num_train=23_808, batch_size=256, epochs=2, dp=False)
    >>> plan.steps_per_epoch, plan.total_steps     # ceil(23808 / 256) = 93 shuffled batches
    (93, 186)
    >>> plan = make_plan(num_train=30_000, batch_size=256, epochs=30, noise_multiplier=1.3, delta=1e-5)
    >>> plan.sample_rate == 1 / 118, plan.steps_per_epoch, plan.expected_batch_size, plan.total_steps
    (True, 118, 254, 3540)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from dpvision.privacy.accounting import (
    AUTO_DELTA_FACTOR,
    calibrate_noise_multiplier,
    check_accountant,
    expected_batch_size,
    poisson_sample_rate,
    resolve_delta,
    steps_per_epoch,
)

DEFAULT_NOISE_MULTIPLIER = 1.0


@dataclass(frozen=True, kw_only=True)
class Plan:
    """N, B, q, steps, E[B], σ, C, δ and the schedule's length of one run.

    ``sample_rate``, ``steps_per_epoch``, ``expected_batch_size``, ``total_steps`` and
    ``warmup_steps`` are derived in ``__post_init__`` (never passed in, never recomputed).
    """

    num_train: int  # N: examples trained on (all ranks together)
    batch_size: int  # B: expected batch size under DP (Poisson), the batch size without
    epochs: int
    dp: bool = True
    noise_multiplier: float = 0.0  # σ (0.0 without DP)
    max_grad_norm: float = math.inf  # C (inf without DP)
    delta: float = 1e-5
    accountant: str = "rdp"  # the primary accountant: reported, calibrated to, budgeted
    clipping: str = "flat"  # the per-example clipping rule (engines' registry)
    warmup_epochs: float = 0.0  # the learning rate's linear warm-up

    sample_rate: float = field(init=False)  # q = 1 / ceil(N / B)
    steps_per_epoch: int = field(init=False)
    expected_batch_size: int = field(init=False)  # E[B] = N // ceil(N / B): the noisy sum's divisor
    total_steps: int = field(init=False)  # epochs * steps_per_epoch: what a cosine schedule decays over
    warmup_steps: int = field(init=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.num_train, int) and self.num_train >= 1):
            raise ValueError(f"num_train must be a positive integer, got {self.num_train!r}")
        if not (isinstance(self.batch_size, int) and 1 <= self.batch_size <= self.num_train):
            raise ValueError(f"batch_size must be between 1 and the {self.num_train} training examples, "
                             f"got {self.batch_size!r}")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.dp:
            if not self.noise_multiplier >= 0:
                raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
            if not 0 < self.max_grad_norm < math.inf:
                raise ValueError(f"max_grad_norm must be a positive number, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        check_accountant(self.accountant, "accountant")
        q = poisson_sample_rate(self.num_train, self.batch_size)
        per_epoch = steps_per_epoch(q) if self.dp else math.ceil(self.num_train / self.batch_size)
        derived = {
            "sample_rate": q,
            "steps_per_epoch": per_epoch,
            "expected_batch_size": expected_batch_size(self.num_train, q),
            "total_steps": self.epochs * per_epoch,
            "warmup_steps": round(self.warmup_epochs * per_epoch),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def resolved(self) -> dict:
        """What ``config.yaml``'s ``resolved`` section and ``summary.json`` record of the plan."""
        return {"num_train": self.num_train, "sample_rate": self.sample_rate, "steps_per_epoch": self.steps_per_epoch,
                "expected_batch_size": self.expected_batch_size, "total_steps": self.total_steps,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "delta": self.delta}


def make_plan(*, num_train: int, batch_size: int, epochs: int, dp: bool = True,
              noise_multiplier: float | None = None, target_epsilon: float | None = None,
              max_grad_norm: float = 1.0, delta: float | str = 1e-5, accountant: str = "rdp",
              clipping: str = "flat", warmup_epochs: float = 0.0, allow_large_delta: bool = False) -> Plan:
    """The plan of a run: δ resolved (``"auto"`` = 1 / (10 N)), σ given, default or calibrated.

    With ``target_epsilon`` σ is calibrated so that ``epochs`` epochs end at ε <= target under
    ``accountant`` (``ValueError`` naming ``target_epsilon`` when unreachable). Under DP the δ
    policy (:func:`check_delta`) refuses δ >= 1/N unless ``allow_large_delta``.
    """
    resolved_delta = resolve_delta(delta, num_train)
    if not dp:
        return Plan(num_train=num_train, batch_size=batch_size, epochs=epochs, dp=False, delta=resolved_delta,
                    accountant=accountant, clipping=clipping, warmup_epochs=warmup_epochs)
    check_delta(resolved_delta, num_train, allow_large_delta=allow_large_delta)
    base = Plan(num_train=num_train, batch_size=batch_size, epochs=epochs, dp=True,
                noise_multiplier=DEFAULT_NOISE_MULTIPLIER if noise_multiplier is None else float(noise_multiplier),
                max_grad_norm=float(max_grad_norm), delta=resolved_delta, accountant=accountant, clipping=clipping,
                warmup_epochs=warmup_epochs)
    if target_epsilon is None:
        return base
    try:
        sigma = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=resolved_delta,
                                           sample_rate=base.sample_rate, steps=base.total_steps,
                                           accountant=accountant)
    except ValueError as err:
        raise ValueError(f"target_epsilon: {err}") from None
    return Plan(num_train=num_train, batch_size=batch_size, epochs=epochs, dp=True, noise_multiplier=sigma,
                max_grad_norm=float(max_grad_norm), delta=resolved_delta, accountant=accountant, clipping=clipping,
                warmup_epochs=warmup_epochs)


def check_delta(delta: float, num_train: int, *, allow_large_delta: bool = False) -> None:
    """The δ policy of a DP run on ``num_train`` examples: refuse δ >= 1/N, warn above 1/(10 N).

    The accepted convention is δ well below 1/N: a mechanism that publishes one random
    example in full is (0, 1/N)-DP, so δ >= 1/N allows that. ``allow_large_delta`` (the
    user insisting, ``dp.allow_large_delta: true``) turns the refusal into the warning.

    Example:
        >>> check_delta(1e-6, 30_000)
        >>> check_delta(0.5, 30_000)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: dp.delta 0.5 is at least 1/N = 3.33e-05 (N = 30000 training examples): the accepted ...
    """
    limit = 1.0 / num_train
    if delta >= limit and not allow_large_delta:
        raise ValueError(f"dp.delta {delta:g} is at least 1/N = {limit:.3g} (N = {num_train} training examples): "
                         "the accepted convention is delta well below 1/N (a delta of 1/N allows publishing an "
                         "example outright); use a smaller dp.delta, 'auto' for 1/(10 N), or set "
                         "dp.allow_large_delta to insist")
    auto = 1.0 / (AUTO_DELTA_FACTOR * num_train)  # exactly resolve_delta's "auto", which must not warn
    if delta > auto:
        warnings.warn(f"dp.delta {delta:g} is above 1/(10 N) = {auto:.3g} (N = {num_train}): "
                      "delta should be well below 1/N ('auto' gives 1/(10 N))", stacklevel=3)

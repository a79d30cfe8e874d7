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

The DP settings (the recipe's ``dp`` section) are one :class:`DPSettings`, checked when made; δ is
parsed, resolved (``"auto"``) and held to the 1/N convention here, and nowhere else.

Releases before training (``Plan.releases``): a ScatterNet model's private input normalisation
(``model.input_norm: private``) releases its channel statistics with two Gaussian mechanisms of
noise multiplier σ_norm on the whole training set, the history entry (σ_norm, 1.0, 2). The ledger
starts with it, and σ is calibrated so that it and DP-SGD together end at ``target_epsilon``.

Example:
    >>> plan = make_plan(DPSettings(enabled=False), num_train=23_808, batch_size=256, epochs=2)
    >>> plan.steps_per_epoch, plan.total_steps     # ceil(23808 / 256) = 93 shuffled batches
    (93, 186)
    >>> plan = make_plan(DPSettings(noise_multiplier=1.3), num_train=30_000, batch_size=256, epochs=30)
    >>> plan.sample_rate == 1 / 118, plan.steps_per_epoch, plan.expected_batch_size, plan.total_steps
    (True, 118, 254, 3540)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

from dpvision.checks import is_number, need
from dpvision.privacy.accounting import (
    check_accountant,
    compute_epsilon,
    expected_batch_size,
    noise_multiplier_for,
    poisson_sample_rate,
    steps_per_epoch,
)
from dpvision.privacy.bounds import MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER

DEFAULT_NOISE_MULTIPLIER = 1.0
AUTO_DELTA_FACTOR = 10  # delta "auto": δ = 1 / (10 N), well below the 1/N where DP stops meaning much
INPUT_NORM_RELEASES = 2  # the private input normalisation: channel means, then channel means of squares
# Its defaults: Tramèr & Boneh's σ_norm, and the L2 bound each example's statistics vectors [K] are clipped to
# (about their median norm on MNIST, as their code chose it)
INPUT_NORM_NOISE_MULTIPLIER = 8.0
INPUT_NORM_BOUND = 0.4


@dataclass(kw_only=True)
class DPSettings:
    """The DP settings of a run (a recipe's ``dp`` section), each checked in ``__post_init__`` (``dp.<field>``).

    ``clipping`` is a rule's name; the rules are the engines' (the job's config checks the name).
    """

    enabled: bool = True
    noise_multiplier: float | None = None  # σ; None: calibrated from target_epsilon, or DEFAULT_NOISE_MULTIPLIER
    target_epsilon: float | None = None  # calibrate σ so that the whole run ends at this ε
    max_grad_norm: float = 1.0  # per-example clipping norm C
    delta: float | str = 1e-5  # or "auto": 1 / (10 N), resolved once N is known; must be < 1/N
    allow_large_delta: bool = False  # insist on a δ >= 1/N (refused otherwise: no meaningful guarantee)
    accountant: str = "rdp"  # the ε reported, calibrated to and budgeted; metrics.csv has rdp, prv and pld
    max_epsilon: float | None = None  # budget: stop before the first step that would exceed it
    clipping: str = "flat"  # the per-example clipping rule (the engines' registry): flat or automatic
    # model.input_norm private only: σ_norm of its two Gaussian releases and the L2 bound each example's
    # statistics vectors are clipped to; None: INPUT_NORM_NOISE_MULTIPLIER, INPUT_NORM_BOUND (input_norm_settings)
    input_norm_noise_multiplier: float | None = None
    input_norm_bound: float | None = None

    DEFAULT_NOISE_MULTIPLIER = DEFAULT_NOISE_MULTIPLIER

    def __post_init__(self) -> None:
        need(isinstance(self.enabled, bool), "dp.enabled", "true or false", self.enabled)
        if self.noise_multiplier is not None:
            need(is_number(self.noise_multiplier) and self.noise_multiplier >= 0, "dp.noise_multiplier",
                  "a number >= 0", self.noise_multiplier)
        for name in ("target_epsilon", "max_epsilon"):
            value = getattr(self, name)
            if value is not None:
                need(is_number(value) and value > 0, f"dp.{name}", "a positive number", value)
        need(is_number(self.max_grad_norm) and self.max_grad_norm > 0, "dp.max_grad_norm", "a positive number",
              self.max_grad_norm)
        self.delta = parse_delta(self.delta, "dp.delta")
        need(isinstance(self.allow_large_delta, bool), "dp.allow_large_delta", "true or false",
              self.allow_large_delta)
        check_accountant(self.accountant, "dp.accountant")
        need(isinstance(self.clipping, str), "dp.clipping", "a clipping rule's name", self.clipping)
        sigma_norm, bound = self.input_norm_settings()
        need(is_number(sigma_norm) and MIN_NOISE_MULTIPLIER <= sigma_norm <= MAX_NOISE_MULTIPLIER,
             "dp.input_norm_noise_multiplier", f"a number in [{MIN_NOISE_MULTIPLIER:g}, {MAX_NOISE_MULTIPLIER:g}]",
             sigma_norm)
        need(is_number(bound) and 0 < bound < math.inf, "dp.input_norm_bound", "a positive number", bound)
        if self.noise_multiplier is not None and self.target_epsilon is not None:
            raise ValueError("dp.noise_multiplier and dp.target_epsilon exclude each other: the target calibrates "
                             "the noise multiplier; give one of them")
        if not self.enabled:
            for name in ("noise_multiplier", "target_epsilon", "max_epsilon", "input_norm_noise_multiplier",
                         "input_norm_bound"):
                if getattr(self, name) is not None:
                    raise ValueError(f"dp.{name} needs DP: a run without DP adds no noise and spends no privacy "
                                     f"(drop dp.{name}, or enable DP)")

    def deactivated(self):
        """The same settings with DP off (and nothing that only DP uses)."""
        return replace(self, enabled=False, noise_multiplier=None, target_epsilon=None, max_epsilon=None,
                       input_norm_noise_multiplier=None, input_norm_bound=None)

    def input_norm_settings(self) -> tuple[float, float]:
        """(σ_norm, clipping bound) of a private input normalisation: as given, or the defaults."""
        sigma_norm, bound = self.input_norm_noise_multiplier, self.input_norm_bound
        return (INPUT_NORM_NOISE_MULTIPLIER if sigma_norm is None else sigma_norm,
                INPUT_NORM_BOUND if bound is None else bound)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """N, B, q, steps, E[B], σ, C, δ and the schedule's length of one run.

    ``sample_rate``, ``steps_per_epoch``, ``expected_batch_size``, ``total_steps`` and
    ``warmup_steps`` are derived in ``__post_init__`` (never passed in, never recomputed).
    ``releases`` is what the run spends before its first step (empty without DP): its ledger starts there.
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
    releases: tuple = ()  # ((σ, q, n), ...) spent before training: the private input normalisation's (σ_norm, 1, 2)

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
        if self.releases and not self.dp:
            raise ValueError(f"releases {self.releases} need DP: without it nothing is accounted")
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
        resolved = {"num_train": self.num_train, "sample_rate": self.sample_rate,
                    "steps_per_epoch": self.steps_per_epoch, "expected_batch_size": self.expected_batch_size,
                    "total_steps": self.total_steps, "noise_multiplier": self.noise_multiplier,
                    "max_grad_norm": self.max_grad_norm, "delta": self.delta}
        return {**resolved, "releases": [list(entry) for entry in self.releases]} if self.releases else resolved

    def history(self) -> tuple:
        """The ledger history of the whole planned run, ``((σ, q, steps), ...)``: the releases, then DP-SGD."""
        return (*self.releases, (self.noise_multiplier, self.sample_rate, self.total_steps)) if self.dp else ()


def make_plan(dp: DPSettings, *, num_train: int, batch_size: int, epochs: int, warmup_epochs: float = 0.0,
              check_work: bool = False, private_input_norm: bool = False) -> Plan:
    """The plan of a run of ``epochs`` epochs at batch size ``batch_size`` on ``num_train`` examples under ``dp``.

    ``private_input_norm`` (``model.input_norm: private``): under DP the run first releases its input
    statistics, ``releases = ((σ_norm, 1.0, 2),)`` (σ_norm: ``dp.input_norm_noise_multiplier``, default 8), which the calibration, the
    budget (refused when they alone exceed ``dp.max_epsilon``) and the ledger include.

    δ is resolved (``"auto"`` = 1 / (10 N)) and, under DP, held to the δ policy (:func:`check_delta`);
    σ is given, the default, or calibrated so that the run ends at ε <= ``dp.target_epsilon`` under
    ``dp.accountant`` (``ValueError`` naming ``dp.target_epsilon`` when unreachable). ``check_work``
    (the training job) also refuses a σ out of range, or one its accountant cannot account within
    bounded memory (:func:`~dpvision.privacy.accounting.noise_multiplier_for`).
    """
    delta = resolve_delta(dp.delta, num_train)
    common = dict(num_train=num_train, batch_size=batch_size, epochs=epochs, delta=delta, accountant=dp.accountant,
                  clipping=dp.clipping, warmup_epochs=warmup_epochs)
    if not dp.enabled:
        return Plan(dp=False, **common)
    check_delta(delta, num_train, allow_large_delta=dp.allow_large_delta)
    releases = ((float(dp.input_norm_settings()[0]), 1.0, INPUT_NORM_RELEASES),) if private_input_norm else ()
    check_releases(releases, dp, delta)
    given = DEFAULT_NOISE_MULTIPLIER if dp.noise_multiplier is None else float(dp.noise_multiplier)
    base = Plan(dp=True, noise_multiplier=given, max_grad_norm=float(dp.max_grad_norm), releases=releases, **common)
    sigma = noise_multiplier_for(given, target_epsilon=dp.target_epsilon, delta=delta, sample_rate=base.sample_rate,
                                 steps=base.total_steps, accountant=dp.accountant, check_work=check_work,
                                 releases=releases)
    plan = base if sigma == given else replace(base, noise_multiplier=sigma)
    if releases and check_work:  # the whole planned history, once: a PRV/PLD grid too large is refused now
        compute_epsilon(plan.history(), delta=delta, accountant=dp.accountant)
    return plan


def check_releases(releases: tuple, dp: DPSettings, delta: float) -> None:
    """Refuse releases before training that alone spend more than ``dp.max_epsilon`` or ``dp.target_epsilon``."""
    if not releases:
        return
    spent = compute_epsilon(releases, delta=delta, accountant=dp.accountant)
    for name in ("target_epsilon", "max_epsilon"):
        value = getattr(dp, name)
        if value is not None and spent >= value:
            raise ValueError(f"dp.{name} {value:g} is not above the epsilon of the private input normalisation alone "
                             f"({spent:.4g} at dp.input_norm_noise_multiplier {releases[0][0]:g}, delta {delta:g}): "
                             f"raise dp.{name} or dp.input_norm_noise_multiplier")


def parse_delta(value: float | str, where: str = "dp.delta") -> float | str:
    """δ as given (a number, a numeric string, or ``"auto"``) -> a float in (0, 1) or ``"auto"``.

    The one place δ is parsed: the settings, every front-end and :func:`resolve_delta` call it.

    Example:
        >>> parse_delta("1e-5"), parse_delta(" AUTO "), parse_delta(1e-5)
        (1e-05, 'auto', 1e-05)
        >>> parse_delta("sometimes")
        Traceback (most recent call last):
        ...
        ValueError: dp.delta must be a number in (0, 1) or 'auto', got 'sometimes'
    """
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:  # also NaN
        raise ValueError(f"{where} must be a number in (0, 1) or 'auto', got {value!r}")
    return float(value)


def resolve_delta(delta: float | str, num_examples: int) -> float:
    """δ for ``num_examples`` training examples: ``"auto"`` becomes 1 / (10 N), a number stays itself.

    Example:
        >>> resolve_delta("auto", 30_000)
        3.3333333333333333e-06
        >>> resolve_delta("1e-5", 30_000)
        1e-05
    """
    delta = parse_delta(delta)
    return 1.0 / (AUTO_DELTA_FACTOR * num_examples) if delta == "auto" else delta


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

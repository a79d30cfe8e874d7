"""The per-epoch pieces of the training job (and of the audit, which trains through the same function).

* :func:`train_private_epoch` runs one epoch of the plan, cut short before the first
  step that would exceed a :class:`~dpvision.privacy.budget.PrivacyBudget`, and
  records the steps actually taken in the :class:`PrivacyLedger`.
* :func:`epsilon_columns` gives ε under every accountant for the metrics row
  (``epsilon_rdp``, ``epsilon_prv``, ``epsilon_pld``).
* :class:`BestModel` keeps the weights of the best validation epoch and owns ``model_best.pt``.
* the per-epoch checkpoint of a run folder is :class:`dpvision.checkpoint.Checkpointer`'s (with
  :func:`~dpvision.checkpoint.check_ledger`, which refuses a ledger the plan does not imply).
* :func:`check_resume_flags` enforces "with ``--resume`` only flags that cannot
  change the result may be given again".

Write order matters for privacy, not only for crash safety: a job saves the
epoch's checkpoint *before* it writes or prints anything about that epoch, so
nothing released ever comes from steps that a resume would discard and replay
(docs/privacy.md, "Checkpoints and resume").

Example (the skeleton of a job's loop):
    >>> for epoch in range(start_epoch, plan.epochs + 1):                  # doctest: +SKIP
    ...     outcome = train_private_epoch(engine, ledger, plan, budget=budget)
    ...     row = {"epoch": epoch, **epsilon_columns(ledger, delta=plan.delta, dp=plan.dp)}
    ...     checkpointer.save(engine_state=engine.state_dict(), ledger=ledger, epoch=epoch, steps=ledger.steps)
    ...     if outcome.stopped: break
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from dpvision.engines import Engine, EpochResult
from dpvision.privacy.accounting import ACCOUNTANTS, PrivacyLedger
from dpvision.privacy.budget import PrivacyBudget
from dpvision.runs import atomic_torch_save

EPSILON_COLUMNS = [f"epsilon_{name}" for name in ACCOUNTANTS]


@dataclass
class EpochOutcome:
    """What one (possibly budget-shortened) epoch did."""

    result: EpochResult | None  # None when not a single step fitted in the budget
    steps: int
    stopped: bool  # True when the budget cut this epoch short (training must end)
    stop_reason: str | None = None


def train_private_epoch(engine: Engine, ledger: PrivacyLedger, plan, *, budget: PrivacyBudget | None = None,
                        max_steps: int | None = None, progress: Callable[[int], None] | None = None) -> EpochOutcome:
    """One epoch of ``engine`` (or its first ``max_steps`` steps), at most as many steps as ``budget``
    allows; the steps taken go into ``ledger`` at the plan's σ and q.

    ``plan``: the run's :class:`~dpvision.privacy.plan.Plan` (``dp``, ``noise_multiplier``,
    ``sample_rate``, ``steps_per_epoch``). Without DP the ledger and budget are left alone.
    """
    per_epoch = plan.steps_per_epoch
    planned = per_epoch if max_steps is None else min(max_steps, per_epoch)
    sampled = {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate}
    allowed = planned
    if plan.dp and budget is not None:
        allowed = budget.allowed_steps(ledger, planned=planned, **sampled)
    reason = None
    if allowed < planned:
        reason = budget.stop_reason(ledger.extended(steps=allowed, **sampled), **sampled)
    if allowed == 0:
        return EpochOutcome(result=None, steps=0, stopped=True, stop_reason=reason)
    result = engine.train_epoch(max_steps=allowed if allowed < per_epoch else None, progress=progress)
    if plan.dp:
        # The steps the engine reports, not the plan: this is what the ε is about.
        ledger.record(steps=result.steps, **sampled)
    return EpochOutcome(result=result, steps=result.steps, stopped=allowed < planned, stop_reason=reason)


def epsilon_columns(ledger: PrivacyLedger, *, delta: float, dp: bool = True,
                    primary: str | None = None) -> dict[str, float]:
    """``{"epsilon_rdp": ..., "epsilon_prv": ..., "epsilon_pld": ...}`` for the steps in ``ledger``.

    All three are bounds on the same mechanism (Poisson-sampled Gaussian steps);
    they differ only in how tightly they compose. An approximate ``primary`` (``gdp``) is
    added (``epsilon_gdp``; the row's ``epsilon``, never a column). Without DP every entry is ∞.
    """
    if not dp:
        return {column: math.inf for column in (*EPSILON_COLUMNS, f"epsilon_{primary or 'rdp'}")}
    # The primary accountant always answers; a secondary one whose work would be unbounded is inf
    # (ledger.epsilon_notes says why): never less than was spent.
    return {f"epsilon_{name}": value for name, value in ledger.epsilons(delta=delta, primary=primary).items()}


class BestModel:
    """The weights of the best validation epoch (``run.select: best_val``), like timm's ``CheckpointSaver``.

    It decides what is best, writes ``model_best.pt`` (``path``; ``None`` on the ranks that
    write nothing) and travels in the checkpoint (:meth:`state_dict`), so a resumed run
    continues the same comparison.
    """

    FILE = "model_best.pt"

    def __init__(self, enabled: bool, path: str | Path | None = None) -> None:
        self.enabled, self.path = enabled, None if path is None else Path(path)
        self.epoch, self.metric, self.weights = 0, -math.inf, None

    def update(self, epoch: int, metric: float, model: torch.nn.Module) -> bool:
        """Keep ``model``'s weights when ``metric`` beats the best so far (NaN never does); True if it did."""
        if not (self.enabled and metric > self.metric):
            return False
        self.epoch, self.metric = epoch, metric
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def save(self) -> None:
        """Write ``model_best.pt`` (after the epoch's checkpoint: see the module's note on write order)."""
        if self.path is not None and self.weights is not None:
            atomic_torch_save(self.weights, self.path)

    def summary(self) -> dict[str, Any]:
        """``best_epoch`` and ``best_val_accuracy`` for ``summary.json`` (NaN before any epoch improved)."""
        return {"best_epoch": self.epoch, "best_val_accuracy": self.metric if self.epoch else math.nan}

    def state_dict(self) -> dict[str, Any]:
        return {"best_epoch": self.epoch, "best_val_accuracy": self.metric, "best_state": self.weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch = int(state.get("best_epoch", 0))
        self.metric = float(state.get("best_val_accuracy", -math.inf))
        self.weights = state.get("best_state")


def resume_overrides(args, given: Iterable[str], fields: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """``{config field: value}`` for the resume-free flags that were typed (``fields``: flag -> (field, attr)).

    Example:
        >>> from types import SimpleNamespace
        >>> resume_overrides(SimpleNamespace(device="cpu", quiet=False), ["--resume", "--device"],
        ...                  {"--device": ("run.device", "device"), "--quiet": ("run.quiet", "quiet")})
        {'run.device': 'cpu'}
    """
    given = list(given)
    return {field: getattr(args, attr) for flag, (field, attr) in fields.items() if flag in given}


def check_resume_flags(given: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise a one-line ``ValueError`` if a flag other than ``allowed`` was given with ``--resume``.

    Example:
        >>> check_resume_flags(["--resume", "--quiet"], ["--resume", "--quiet", "--device"])
        >>> check_resume_flags(["--resume", "--lr"], ["--resume", "--quiet"])
        Traceback (most recent call last):
        ...
        ValueError: --lr cannot be given with --resume: a resumed run takes every setting from its saved config (only --quiet may be given again)
    """
    allowed = list(allowed)
    refused = [flag for flag in given if flag not in allowed]
    if refused:
        again = ", ".join(f for f in allowed if f != "--resume")
        raise ValueError(f"{', '.join(refused)} cannot be given with --resume: a resumed run takes every "
                         f"setting from its saved config (only {again} may be given again)")

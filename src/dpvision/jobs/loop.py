"""The per-epoch pieces of the training job (and of the audit, which trains through the same function).

* :func:`train_private_epoch` runs one epoch, cut short before the first step
  that would exceed a :class:`~dpvision.privacy.budget.PrivacyBudget`, and
  records the steps actually taken in the :class:`PrivacyLedger`.
* :func:`epsilon_columns` gives ε under every accountant for the metrics row
  (``epsilon_rdp``, ``epsilon_prv``, ``epsilon_pld``).
* :class:`Checkpointer` writes and restores the per-epoch checkpoint of a run
  folder and refuses a checkpoint of another configuration.
* :func:`check_resume_flags` enforces "with ``--resume`` only flags that cannot
  change the result may be given again".

Write order matters for privacy, not only for crash safety: a job saves the
epoch's checkpoint *before* it writes or prints anything about that epoch, so
nothing released ever comes from steps that a resume would discard and replay
(docs/privacy.md, "Checkpoints and resume").

Example (the skeleton of a job's loop):
    >>> for epoch in range(start_epoch, epochs + 1):                      # doctest: +SKIP
    ...     outcome = train_private_epoch(engine, ledger, noise_multiplier=sigma, budget=budget)
    ...     row = {"epoch": epoch, **epsilon_columns(ledger, delta=delta, dp=True)}
    ...     checkpointer.save(engine=engine, ledger=ledger, epoch=epoch, extra={"rows": rows})
    ...     if outcome.stopped: break
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from dpvision.checkpoint import CHECKPOINT_NAME, config_fingerprint, load_checkpoint, save_checkpoint
from dpvision.privacy.accounting import ACCOUNTANTS, PrivacyLedger
from dpvision.privacy.budget import PrivacyBudget
from dpvision.engines import Engine, EpochResult

EPSILON_COLUMNS = [f"epsilon_{name}" for name in ACCOUNTANTS]


@dataclass
class EpochOutcome:
    """What one (possibly budget-shortened) epoch did."""

    result: EpochResult | None  # None when not a single step fitted in the budget
    steps: int
    stopped: bool  # True when the budget cut this epoch short (training must end)
    stop_reason: str | None = None


def train_private_epoch(engine: Engine, ledger: PrivacyLedger, *, noise_multiplier: float,
                        budget: PrivacyBudget | None = None, max_steps: int | None = None,
                        progress: Callable[[int], None] | None = None) -> EpochOutcome:
    """One epoch of ``engine`` (or its first ``max_steps`` steps), at most as many steps as ``budget``
    allows; the steps taken go into ``ledger``.

    Without DP (``engine.plan.dp`` false) the ledger and budget are left alone.
    """
    planned = engine.steps_per_epoch if max_steps is None else min(max_steps, engine.steps_per_epoch)
    dp = engine.plan.dp
    allowed = planned
    if dp and budget is not None:
        allowed = budget.allowed_steps(ledger, noise_multiplier=noise_multiplier,
                                       sample_rate=engine.sample_rate, planned=planned)
    reason = None
    if allowed < planned:
        reason = budget.stop_reason(ledger.extended(noise_multiplier=noise_multiplier,
                                                    sample_rate=engine.sample_rate, steps=allowed),
                                    noise_multiplier=noise_multiplier, sample_rate=engine.sample_rate)
    if allowed == 0:
        return EpochOutcome(result=None, steps=0, stopped=True, stop_reason=reason)
    result = engine.train_epoch(max_steps=allowed if allowed < engine.steps_per_epoch else None, progress=progress)
    if dp:
        # The steps the engine reports, not the plan: this is what the ε is about.
        ledger.record(noise_multiplier=noise_multiplier, sample_rate=engine.sample_rate, steps=result.steps)
    return EpochOutcome(result=result, steps=result.steps, stopped=allowed < planned, stop_reason=reason)


def epsilon_columns(ledger: PrivacyLedger, *, delta: float, dp: bool = True,
                    primary: str | None = None) -> dict[str, float]:
    """``{"epsilon_rdp": ..., "epsilon_prv": ..., "epsilon_pld": ...}`` for the steps in ``ledger``.

    All three are bounds on the same mechanism (Poisson-sampled Gaussian steps);
    they differ only in how tightly they compose. Without DP every entry is ∞.
    """
    if not dp:
        return {column: math.inf for column in EPSILON_COLUMNS}
    # The primary accountant always answers; a secondary one whose work would be unbounded is inf
    # (ledger.epsilon_notes says why): never less than was spent.
    return {f"epsilon_{name}": value for name, value in ledger.epsilons(delta=delta, primary=primary).items()}


class Checkpointer:
    """The checkpoint file of one run folder, tied to the run's config by a fingerprint.

    ``ignore`` names the config keys that cannot change the result (data folder,
    device, verbosity): they are left out of the fingerprint, so a resume may set
    them anew.
    """

    def __init__(self, run_path: str | Path, config: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> None:
        self.path = Path(run_path) / CHECKPOINT_NAME
        self.config = dict(config)
        self.fingerprint = config_fingerprint(self.config, ignore=ignore)

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, *, engine: Engine, ledger: PrivacyLedger, epoch: int, steps: int,
             extra: Mapping[str, Any] | None = None, engine_state: Mapping[str, Any] | None = None) -> None:
        """Write the checkpoint. ``engine_state``: ``engine.state_dict()`` taken already (a distributed
        engine gathers every rank's generators in it, so every rank must have called it)."""
        state = engine.state_dict() if engine_state is None else engine_state
        save_checkpoint(self.path, engine_state=state, ledger_state=ledger.state_dict(),
                        epoch=epoch, steps=steps, config=self.config, fingerprint=self.fingerprint, extra=extra)

    def read(self, map_location) -> dict[str, Any] | None:
        """The checkpoint (refused if another config wrote it), or ``None`` when there is none yet."""
        if not self.exists():
            return None
        return load_checkpoint(self.path, fingerprint=self.fingerprint, map_location=map_location)

    def restore(self, engine: Engine, ledger: PrivacyLedger) -> dict[str, Any] | None:
        """Load the checkpoint into ``engine`` and ``ledger``; ``None`` when there is none yet.

        Returns the checkpoint (``epoch``, ``steps``, ``extra``...). The ledger is
        replaced by the saved one: steps of an interrupted epoch after the checkpoint
        were never released and are replayed with the same generator states.
        """
        state = self.read("cpu")  # generator states must stay on the CPU; the model copies itself over
        if state is None:
            return None
        engine.load_state_dict(state["engine"])
        ledger.load_state_dict(state["ledger"])
        return state


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

"""Per-epoch checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint holds everything needed to continue a run bit for bit: the
engine's state (model, optimizer and the state of every generator: Poisson
sampling, DP noise, data order), the privacy ledger, the epoch and step counts,
the rows already written to the CSVs, and the run's configuration as plain types
together with a fingerprint of its result-affecting part.

Only tensors, dicts, lists, strings, numbers, booleans and ``None`` are stored,
so the safe ``weights_only=True`` unpickler loads it; generator states are the
uint8 tensors ``torch.Generator.get_state()`` returns.

:class:`Checkpointer` is the checkpoint file of one run folder; :func:`check_ledger` refuses,
on resume, a checkpoint whose privacy ledger is not what the plan and its epochs imply.

Example:
    >>> fp = config_fingerprint({"lr": 0.1, "seed": 0, "quiet": True}, ignore=("quiet",))
    >>> fp == config_fingerprint({"seed": 0, "lr": 0.1, "quiet": False}, ignore=("quiet",))
    True
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from dpvision.privacy.accounting import PrivacyLedger
from dpvision.privacy.budget import PrivacyBudget
from dpvision.runs import atomic_torch_save

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used to continue this run (foreign, corrupt, wrong format)."""


def _canonical(obj: Any) -> Any:
    """JSON-stable form: floats by repr (so 0.1 and 0.1000000001 differ), sorted keys."""
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float):
        return repr(obj) if math.isfinite(obj) else str(obj)
    return obj


def config_fingerprint(config: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> str:
    """SHA-256 over the config minus the keys in ``ignore`` (those that cannot change the result)."""
    ignored = set(ignore)
    kept = {k: v for k, v in config.items() if k not in ignored}
    text = json.dumps(_canonical(kept), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Fail at save time (not at resume time) on anything weights_only cannot load."""
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}: checkpoints hold only tensors and plain types")


def _generators_as_uint8(obj: Any) -> Any:
    """Any ``torch.Generator`` left in an engine state becomes its uint8 state tensor."""
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    if isinstance(obj, Mapping):
        return {k: _generators_as_uint8(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_generators_as_uint8(v) for v in obj]
    return obj


def save_checkpoint(path: str | os.PathLike, *, engine_state: Mapping[str, Any], ledger_state: Mapping[str, Any],
                    epoch: int, steps: int, config: Mapping[str, Any], fingerprint: str,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write the checkpoint atomically (temporary file, fsync, rename) and return its path."""
    state = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "epoch": int(epoch),
        "steps": int(steps),
        "engine": _generators_as_uint8(dict(engine_state)),
        "ledger": dict(ledger_state),
        "config": dict(config),
        "extra": dict(extra or {}),
    }
    _check_plain(state)
    atomic_torch_save(state, path)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, *, fingerprint: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; refuse a checkpoint of a different config.

    ``fingerprint`` is that of the run being continued; a checkpoint written under
    any other result-affecting setting raises :class:`CheckpointError`.
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # a truncated or foreign file: say which and why, in one line
        raise CheckpointError(f"{path} is not a readable dpvision checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not a dpvision checkpoint of format {FORMAT_VERSION}")
    if fingerprint is not None and state.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"{path} was written by a run with a different configuration (config fingerprint "
            f"{str(state.get('fingerprint'))[:12]}..., this run's is {fingerprint[:12]}...); refusing to "
            "continue from it")
    return state


class Checkpointer:
    """The checkpoint file of one run folder, tied to the run's config by a fingerprint.

    ``ignore`` names the config keys that cannot change the result (data folder,
    device, verbosity): they are left out of the fingerprint, so a resume may set
    them anew.
    """

    FILE = CHECKPOINT_NAME

    def __init__(self, run_path: str | Path, config: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> None:
        self.path = Path(run_path) / self.FILE
        self.config = dict(config)
        self.fingerprint = config_fingerprint(self.config, ignore=ignore)

    def save(self, *, engine_state: Mapping[str, Any], ledger: PrivacyLedger, epoch: int, steps: int,
             extra: Mapping[str, Any] | None = None) -> None:
        """Write the checkpoint. ``engine_state``: ``engine.state_dict()`` (a distributed engine gathers
        every rank's generators in it, so every rank must have called it)."""
        save_checkpoint(self.path, engine_state=engine_state, ledger_state=ledger.state_dict(),
                        epoch=epoch, steps=steps, config=self.config, fingerprint=self.fingerprint, extra=extra)

    def read(self, map_location) -> dict[str, Any] | None:
        """The checkpoint (refused if another config wrote it), or ``None`` when there is none yet."""
        if not self.path.exists():
            return None
        return load_checkpoint(self.path, fingerprint=self.fingerprint, map_location=map_location)


def implied_ledger(plan, budget: PrivacyBudget | None, epochs: int, *, stopped: bool) -> tuple[PrivacyLedger, list]:
    """The ledger ``epochs`` completed epochs of ``plan`` leave, and the steps after each epoch.

    Every epoch takes ``plan.steps_per_epoch`` steps at the plan's σ and q, except that the last
    one of a run the budget ``stopped`` takes exactly the steps the budget allowed. It starts with the
    plan's releases before training (a private input normalisation). Without DP: empty.
    """
    ledger, after = PrivacyLedger.starting_with(plan.releases), []
    sampled = {"noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate}
    for epoch in range(1, epochs + 1):
        steps = plan.steps_per_epoch
        if stopped and epoch == epochs and budget is not None:
            steps = budget.allowed_steps(ledger, planned=steps, **sampled)
        if plan.dp:
            ledger.record(steps=steps, **sampled)
        after.append(ledger.steps)
    return ledger, after


def check_ledger(state: Mapping[str, Any], plan, budget: PrivacyBudget | None, *, logged: list[int],
                 path: str | Path) -> None:
    """Refuse (one line naming ``path``) a checkpoint whose ledger the plan and its epochs do not imply.

    ε is computed from the ledger, so a hand-edited or damaged one would print a wrong ε. Checked
    under DP: the ledger, the checkpoint's step count and its metrics rows' ``steps`` against
    :func:`implied_ledger`, and ``logged`` (metrics.csv's ``steps`` column, which may lag the
    checkpoint by the one row a crash between the two writes can lose) against those rows.
    """
    rows = list(state.get("extra", {}).get("metrics", []))
    epochs = int(state.get("epoch", -1))
    if [int(r["epoch"]) for r in rows] != list(range(1, epochs + 1)):
        raise CheckpointError(f"{path}: its metrics rows do not cover epochs 1 to {epochs}; refusing to resume")
    steps = [int(r["steps"]) for r in rows]
    if logged != steps[:len(logged)] or len(logged) < len(steps) - 1:
        raise CheckpointError(f"{path}: its steps per epoch {steps} disagree with metrics.csv's steps column "
                              f"{logged}; refusing to resume")
    if not plan.dp and not state["ledger"]["history"]:
        return
    stopped = state.get("extra", {}).get("stop_reason") is not None
    expected, after = implied_ledger(plan, budget, epochs, stopped=stopped)
    saved = [[float(s), float(q), int(n)] for s, q, n in state["ledger"]["history"]]
    counted = int(state.get("steps", -1))
    released = int(state["ledger"].get("released", expected.released))  # (absent in older checkpoints)
    if (saved != expected.state_dict()["history"] or released != expected.released or steps != after
            or counted != (after[-1] if after else 0)):
        raise CheckpointError(
            f"{path}: its privacy ledger {saved} ({released} released before training, {counted} steps, metrics "
            f"rows {steps}) is not what the plan and its {epochs} completed epochs imply "
            f"({expected.state_dict()['history']}, {expected.released} released, steps {after}); "
            "refusing to resume from an edited or damaged checkpoint")

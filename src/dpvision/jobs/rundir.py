"""A training run's folder: created (or reopened for ``--resume``), locked, tied to its config.

``config.yaml`` holds the recipe that ran, section by section, so the file is itself a
valid ``--config``; its ``resolved`` section records what was derived from it (σ, q, δ,
N, the training data's fingerprint, the device). A resume reads it back, may change only
the keys that cannot change the result (``RESUME_FREE_KEYS``), and continues from the
checkpoint, which is refused when written under any other setting.

Example:
    >>> flat({"optim": {"lr": 0.1}, "dp": {"enabled": True}})
    {'optim.lr': 0.1, 'dp.enabled': True}
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping

import yaml

import dpvision
from dpvision.checkpoint import Checkpointer
from dpvision.jobs.config import RESOLVED, SECTIONS, TrainConfig
from dpvision.jobs.loop import BestModel
from dpvision.jobs.report import METRIC_COLUMNS
from dpvision.runs import RunDir

# Settings that cannot change the numbers: a resumed run may set them anew.
RESUME_FREE_KEYS = ("data.root", "data.download", "run.device", "run.quiet", "run.runs_dir", "run.run_name",
                    "run.tensorboard", "run.max_minutes")
CURVES = "curves.png"
TENSORBOARD = "tensorboard"
# What a finished run folder may hold, in the order the closing "Outputs:" line names them.
OUTPUTS = (RunDir.CONFIG, RunDir.METRICS, RunDir.SUMMARY, RunDir.MODEL, BestModel.FILE, CURVES, Checkpointer.FILE,
           f"{TENSORBOARD}/")
_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}  # how summary.json writes them


def flat(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"section.field": value}`` for the config sections of ``sections``."""
    return {f"{name}.{key}": value for name, values in sections.items() if name in SECTIONS
            for key, value in (values or {}).items()}


def default_run_name(config: TrainConfig, plan) -> str:
    """A name that says what ran: model, optimizer, batch, epochs, seed, and σ and C under DP."""
    optim = config.optim
    model = config.model.name.replace(":", "-").replace(".", "-")  # torchvision:resnet18, pkg.mod:make_net
    name = f"{model}_{optim.name}_lr{optim.lr:g}_b{optim.batch_size}_e{optim.epochs}_seed{config.run.seed}"
    if plan.dp:
        name += f"_sigma{plan.noise_multiplier:.4g}_C{plan.max_grad_norm:g}"
    return name


def resolved_section(plan, data, *, engine: str, device) -> dict[str, Any]:
    """``config.yaml``'s ``resolved`` section: what was derived from the recipe and the data."""
    return {
        "noise_multiplier": plan.noise_multiplier, "max_grad_norm": plan.max_grad_norm, "delta": plan.delta,
        "sample_rate": plan.sample_rate, "steps_per_epoch": plan.steps_per_epoch, "num_train": plan.num_train,
        "num_val": len(data.val) if data.val is not None else 0, "num_test": len(data.test),
        "class_names": list(data.class_names), "data_fingerprint": data.fingerprint, "device": str(device),
        "engine": engine, "dpvision": dpvision.__version__,
    }


def _checkpointer(run_dir: RunDir) -> Checkpointer:
    saved = run_dir.read_config()
    source = flat(saved)
    source["resolved.noise_multiplier"] = saved[RESOLVED]["noise_multiplier"]
    return Checkpointer(run_dir.path, source, ignore=RESUME_FREE_KEYS)


def reopen_run(path: str | os.PathLike) -> tuple[RunDir, Checkpointer]:
    """The run folder ``--resume`` names, locked (refused while another process trains in it)."""
    run_dir = RunDir(path, METRIC_COLUMNS)
    run_dir.lock()
    return run_dir, _checkpointer(run_dir)


def create_run(config: TrainConfig, plan, resolved: dict[str, Any], *, group: str | None, run_name: str | None,
               front_end=None) -> tuple[RunDir, Checkpointer]:
    """A new run folder, locked, with ``config.yaml`` (the recipe plus ``resolved``) written.

    ``front_end(resolved) -> dict`` records a front-end's own outputs (``resolved.front_end``;
    a ``run_name`` there is the default folder name).
    """
    resolved = dict(resolved)
    if front_end is not None:
        resolved["front_end"] = front_end(dict(resolved))
    name = (run_name or config.run.run_name or resolved.get("front_end", {}).get("run_name")
            or default_run_name(config, plan))
    run_dir = RunDir.create(config.run.runs_dir, config.data.dataset if group is None else group, name,
                            METRIC_COLUMNS)
    run_dir.lock()
    # config.yaml is a valid --config of what ran; a sitting's limit is not part of it (run.max_minutes belongs to
    # one invocation: a resume, which reads this file, has none unless given)
    recipe = config.to_dict()
    recipe["run"]["max_minutes"] = None
    run_dir.write_config({**recipe, RESOLVED: resolved})
    return run_dir, _checkpointer(run_dir)


def run_outputs(run_dir: RunDir) -> list[str]:
    """The names in :data:`OUTPUTS` that the folder holds (folders with a trailing ``/``)."""
    return [name for name in OUTPUTS if (run_dir.path / name.rstrip("/")).exists()]


def logged_steps(run_dir: RunDir) -> list[int]:
    """``metrics.csv``'s ``steps`` column (empty when there is no file yet); ``ValueError`` naming the file."""
    path = run_dir.path / RunDir.METRICS
    if not path.is_file():
        return []
    try:
        with open(path, newline="") as handle:
            return [int(row["steps"]) for row in csv.DictReader(handle)]
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: not the metrics.csv of a dpvision run (no whole-number steps column: "
                         f"{type(err).__name__})") from None


def read_summary(run_dir: RunDir) -> dict[str, Any] | None:
    """``summary.json`` as the run returned it (non-finite numbers as floats), or ``None`` if it is unreadable."""
    try:
        saved = json.loads((run_dir.path / RunDir.SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None

    def number(value):
        return _NON_FINITE.get(value, value) if isinstance(value, str) else value

    summary = {key: number(value) for key, value in saved.items()}
    if isinstance(summary.get("epsilons"), dict):
        summary["epsilons"] = {key: number(value) for key, value in summary["epsilons"].items()}
    return summary


def restore(run_path: str | os.PathLike, overrides: Mapping[str, Any]) -> tuple[TrainConfig, dict]:
    """The config of the run in ``run_path`` with ``overrides`` of free keys, and its ``resolved`` section."""
    run_dir = RunDir(run_path)
    path = run_dir.path / RunDir.CONFIG
    if not path.is_file():
        raise ValueError(f"--resume must be a run folder holding {RunDir.CONFIG}, got {str(run_path)!r}")
    try:
        saved = run_dir.read_config()
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get(RESOLVED), dict) \
            or "noise_multiplier" not in saved[RESOLVED]:
        raise ValueError(f"--resume: {path} is not the config of a dpvision training run (no '{RESOLVED}' section)")
    bad = sorted(set(overrides) - set(RESUME_FREE_KEYS))
    if bad:
        raise ValueError(f"{bad[0]} cannot be changed when resuming (only {', '.join(RESUME_FREE_KEYS)} can)")
    try:
        config = TrainConfig.from_dict(saved, source=str(path)).with_overrides(overrides)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from None
    try:
        sigma = float(saved[RESOLVED]["noise_multiplier"])
    except (TypeError, ValueError):
        raise ValueError(f"{path}: resolved.noise_multiplier must be a number") from None
    return config, {**saved[RESOLVED], "noise_multiplier": sigma}

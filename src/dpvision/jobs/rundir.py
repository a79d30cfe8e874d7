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

import os
from typing import Any, Mapping

from dpvision.jobs.config import RESOLVED, SECTIONS, TrainConfig
from dpvision.jobs.loop import Checkpointer
from dpvision.runs import RunDir

# Settings that cannot change the numbers: a resumed run may set them anew.
RESUME_FREE_KEYS = ("data.root", "data.download", "run.device", "run.quiet", "run.runs_dir", "run.run_name",
                    "run.tensorboard")


def flat(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"section.field": value}`` for the config sections of ``sections``."""
    return {f"{name}.{key}": value for name, values in sections.items() if name in SECTIONS
            for key, value in (values or {}).items()}


def default_run_name(config: TrainConfig, plan) -> str:
    """A name that says what ran: model, optimizer, batch, epochs, seed, and σ and C under DP."""
    optim = config.optim
    name = f"{config.model.name}_{optim.name}_lr{optim.lr:g}_b{optim.batch_size}_e{optim.epochs}_seed{config.run.seed}"
    if plan.dp:
        name += f"_sigma{plan.noise_multiplier:.4g}_C{plan.max_grad_norm:g}"
    return name


def _checkpointer(run_dir: RunDir) -> Checkpointer:
    saved = run_dir.read_config()
    source = flat(saved)
    source["resolved.noise_multiplier"] = saved[RESOLVED]["noise_multiplier"]
    return Checkpointer(run_dir.path, source, ignore=RESUME_FREE_KEYS)


def open_run(config: TrainConfig, plan, data, engine, device, *, resume, group: str | None, run_name: str | None,
             columns: list[str], front_end=None) -> tuple[RunDir, Checkpointer]:
    """A new run folder with its config written, or the resumed one; locked either way."""
    if resume is not None:
        run_dir = RunDir(resume, columns)
        run_dir.lock()
        return run_dir, _checkpointer(run_dir)
    import dpvision

    resolved = {
        "noise_multiplier": plan.noise_multiplier, "max_grad_norm": plan.max_grad_norm, "delta": plan.delta,
        "sample_rate": plan.sample_rate, "steps_per_epoch": plan.steps_per_epoch, "num_train": plan.num_train,
        "num_val": len(data.val) if data.val is not None else 0, "num_test": len(data.test),
        "class_names": list(data.class_names), "data_fingerprint": data.fingerprint, "device": str(device),
        "engine": engine.name, "dpvision": dpvision.__version__,
    }
    if front_end is not None:
        resolved["front_end"] = front_end(dict(resolved))
    name = (run_name or config.run.run_name or resolved.get("front_end", {}).get("run_name")
            or default_run_name(config, plan))
    run_dir = RunDir.create(config.run.runs_dir, config.data.dataset if group is None else group, name, columns)
    run_dir.lock()
    run_dir.write_config({**config.to_dict(), RESOLVED: resolved})
    return run_dir, _checkpointer(run_dir)


def restore(run_path: str | os.PathLike, overrides: Mapping[str, Any]) -> tuple[TrainConfig, dict]:
    """The config of the run in ``run_path`` with ``overrides`` of free keys, and its ``resolved`` section."""
    import yaml

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

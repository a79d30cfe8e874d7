"""``dpvision sweep``: one recipe over a list of ε values and seeds, and the privacy-utility frontier.

Every point is an ordinary training run (one run folder each under ``OUT/runs/``), with σ
calibrated to the target ε; the non-private baseline is the same recipe deactivated, once per
seed. The plan is written to ``OUT/sweep.yaml`` first: a restarted sweep skips the runs that
finished, resumes the ones that were interrupted, and refuses a folder that holds another plan.

Outputs: ``results.csv`` (one row per run), ``frontier.png`` (test accuracy against ε, mean and
seed spread, the baseline as a horizontal band) and ``report.md``.

Example:
    >>> plan = plan_runs(epsilons=[1.0, 3.0], seeds=[0, 1], vary=None, baseline=True)
    >>> [p["name"] for p in plan]
    ['eps1_seed0', 'eps1_seed1', 'eps3_seed0', 'eps3_seed1', 'baseline_seed0', 'baseline_seed1']
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from dpvision.jobs.config import TrainConfig
from dpvision.jobs.features import FeatureStore
from dpvision.jobs.setup import Given
from dpvision.jobs.sweep_report import write_outputs
from dpvision.jobs import train as train_job  # train_job.run: looked up at call time (tests replace it)
from dpvision.privacy.accountants import ACCOUNTANTS
from dpvision.runs import atomic_write_text, check_writable_dir

MAX_RUNS = 1000  # a sweep is bounded work: ε values x seeds x varied values (+ baselines)
PLAN_FILE = "sweep.yaml"
# Fields every point sets itself (run_config): varying one would be overwritten or break the folder layout.
SWEEP_FIELDS = ("run.seed", "run.runs_dir", "run.run_name", "run.quiet", "dp.enabled", "dp.target_epsilon",
                "dp.noise_multiplier")


def parse_list(text: str, flag: str, kind=float) -> list:
    """``"0.5,1,3"`` -> ``[0.5, 1.0, 3.0]``; ``ValueError`` naming ``flag`` for anything else."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise ValueError(f"{flag} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} must list at least one value, got {text!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag} lists a value twice: {text!r}")
    return values


def label(value: Any) -> str:
    if value is None:
        return "null"  # as YAML and --set write it
    return f"{value:g}" if isinstance(value, float) else str(value)


def plan_runs(*, epsilons: Sequence[float], seeds: Sequence[int], vary: tuple[str, list] | None,
              baseline: bool) -> list[dict]:
    """The runs of a sweep, each ``{"name", "target_epsilon", "seed", "value"}`` (value: of the varied field)."""
    values = vary[1] if vary else [None]
    suffix = (lambda v: f"_{vary[0]}={label(v)}") if vary else (lambda v: "")
    runs = [{"name": f"eps{label(eps)}_seed{seed}{suffix(v)}", "target_epsilon": eps, "seed": seed, "value": v}
            for eps in epsilons for v in values for seed in seeds]
    if baseline:
        runs += [{"name": f"baseline_seed{seed}{suffix(v)}", "target_epsilon": None, "seed": seed, "value": v}
                 for v in values for seed in seeds]
    if len(runs) > MAX_RUNS:
        raise ValueError(f"--epsilons x --seeds x --vary make {len(runs)} runs; at most {MAX_RUNS}")
    return runs


def run_config(base: TrainConfig, point: dict, vary: tuple[str, list] | None, runs_dir: Path) -> TrainConfig:
    """The config of one point: the recipe with its ε target (or DP off), seed and varied value."""
    overrides = {"run.seed": point["seed"], "run.runs_dir": str(runs_dir), "run.run_name": point["name"],
                 "run.quiet": True}
    if vary:
        overrides[vary[0]] = point["value"]
    if point["target_epsilon"] is None:
        return base.deactivated().with_overrides(overrides)
    overrides.update({"dp.enabled": True, "dp.target_epsilon": point["target_epsilon"], "dp.noise_multiplier": None})
    return base.with_overrides(overrides)


def refuse_sitting_limit(configs: Iterable[TrainConfig], *, why: str, where: str = "") -> None:
    """A one-line ``ValueError`` (``where`` first) if a config sets ``run.max_minutes``: callers that need every run
    finished (a sweep, the accuracy benchmark) refuse a sitting's limit before anything trains."""
    limited = next((c.run.max_minutes for c in configs if c.run.max_minutes is not None), None)
    if limited is not None:
        raise ValueError(f"{where}run.max_minutes {limited:g} would pause a run; {why}")


def sweep(base: TrainConfig, *, epsilons: Sequence[float], seeds: Sequence[int], out: str | Path,
          vary: tuple[str, list] | None = None, baseline: bool = True, command: str = "",
          features: FeatureStore | None = None) -> list[dict]:
    """Run (or finish) every point of the sweep and write the results; returns the result rows. ``features``: a
    store of frozen-prefix features to share with the caller's other sweeps on the same data (default: its own)."""
    if base.dp.enabled is False and not baseline:
        raise ValueError("--config: the recipe has DP switched off; a sweep over ε needs DP")
    points = plan_runs(epsilons=epsilons, seeds=seeds, vary=vary, baseline=baseline)
    runs_dir = Path(out) / "runs"
    configs = {p["name"]: run_config(base, p, vary, runs_dir) for p in points}  # validates every point first
    # Also through --vary: a paused point would have no summary for results.csv.
    refuse_sitting_limit(configs.values(), why="a sweep runs many: give it to dpvision train (or leave it out)")
    out = check_writable_dir(out, flag="--out")  # only now: bad input leaves no folder behind
    plan = {"recipe": base.to_dict(), "epsilons": list(epsilons), "seeds": list(seeds), "baseline": baseline,
            "vary": {"field": vary[0], "values": vary[1]} if vary else None}
    plan_path = out / PLAN_FILE
    if plan_path.exists():
        if yaml.safe_load(plan_path.read_text()) != yaml.safe_load(yaml.safe_dump(plan)):
            raise ValueError(f"--out {str(out)!r} holds another sweep ({plan_path} differs); choose a new --out")
    else:
        atomic_write_text(plan_path, yaml.safe_dump(plan, sort_keys=False))
    # The runs share one data split per seed: a ScatterNet's cached features are computed once per split for all
    # of them (dpvision.jobs.features; a store keys them by the split's and the prefix's contents).
    rows, given = [], Given(features=FeatureStore() if features is None else features)
    for i, point in enumerate(points, start=1):
        folder = runs_dir / point["name"]
        print(f"[{i}/{len(points)}] {point['name']}", end=" ", flush=True)
        summary = _finished(folder)
        if summary is not None:
            print("(done earlier)", flush=True)
        else:
            summary = _run_point(configs[point["name"]], folder, given)
            print(f"test accuracy {summary['test_accuracy']:.4f}, epsilon {summary['epsilon']:.4g}", flush=True)
        rows.append(_result_row(point, vary, summary, folder))
        write_outputs(out, rows, points=points, vary=vary, command=command)
    return rows


def _finished(folder: Path) -> dict | None:
    path = folder / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _run_point(config: TrainConfig, folder: Path, given: Given) -> dict:
    if (folder / "checkpoint.pt").exists():  # interrupted earlier: continue it
        return train_job.run(resume=folder, overrides={"run.quiet": True}, announce=False, given=given)
    if folder.exists():  # created but never checkpointed: nothing to keep
        shutil.rmtree(folder)
    return train_job.run(config, group="", run_name=config.run.run_name, announce=False, given=given)


def _result_row(point: dict, vary, summary: dict, folder: Path) -> dict:
    number = float  # summary.json writes inf as the string "inf", which float() reads back
    epsilons = summary.get("epsilons", {})
    return {
        "name": point["name"], "target_epsilon": point["target_epsilon"] if point["target_epsilon"] else math.inf,
        "seed": point["seed"], "vary": vary[0] if vary else "", "value": "" if not vary else label(point["value"]),
        "test_accuracy": number(summary["test_accuracy"]), "epsilon": number(summary["epsilon"]),
        **{f"epsilon_{k}": number(epsilons.get(k, math.inf)) for k in ACCOUNTANTS},
        "delta": number(summary["delta"]), "noise_multiplier": number(summary["noise_multiplier"]),
        "steps": int(summary["steps"]), "wall_seconds": number(summary["wall_seconds"]), "run_dir": str(folder),
    }

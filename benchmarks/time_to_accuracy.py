"""Time-to-accuracy on CIFAR-10 (issue 24): test accuracy against wall time and example-views, per ε.

One training run per target ε (``--epsilons``, default 1, 2, 4, 8; σ calibrated to each) of one recipe
(``--recipe``, default ``src/dpvision/recipes/default_cifar10.yaml``), the test set evaluated after every
epoch (``run.test_every_epoch``: a curve, not a choice; nothing is selected on it). A long point is made
of several **sittings**: ``--max-minutes M`` stops the invocation cleanly after the epoch whose successor
would end past M minutes (the epoch's checkpoint is on disk), and the same command run again continues
every unfinished run from its last checkpoint -- the result is the one an uninterrupted run gives. Each
invocation rewrites ``time_to_accuracy.json`` and ``time_to_accuracy.png`` under ``--out`` with the curves
so far; ``--write-docs`` puts the table and figure into ``docs/accuracy.md`` (never typed by hand).

    python benchmarks/time_to_accuracy.py --data-root data --device cuda --max-minutes 8   # repeat until done
    python benchmarks/time_to_accuracy.py --write-docs [--out DIR --out DIR2 ...]   # one table of the sittings
    python benchmarks/time_to_accuracy.py --smoke --data-root /tmp/tiny_cifar --device cpu
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import yaml

from dpvision.jobs.config import TrainConfig, load_recipe
from dpvision.jobs.sweep import parse_list

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "src" / "dpvision" / "recipes" / "default_cifar10.yaml"
DOCS = REPO / "docs" / "accuracy.md"
MARKER = "cifar10:time"
EPSILONS = (1.0, 2.0, 4.0, 8.0)
THRESHOLDS = (0.5, 0.6, 0.7, 0.75)  # "time to X% test accuracy" columns
# --smoke: a small CNN on a few hundred images, 3 epochs, ε 1 and 8 (the tests' tiny CIFAR pickles).
SMOKE = {"data.k": 300, "optim.epochs": 3, "optim.batch_size": 64, "model.name": "sample_convnet",
         "model.weight_standardization": False, "run.precision": "auto", "optim.eval_batch_size": 256}
SMOKE_EPSILONS = (1.0, 8.0)


def recipe(path: Path) -> TrainConfig:
    """The recipe without its ``baseline`` section (what ``--disable-dp`` would change; not used here)."""
    values = load_recipe(path)
    values.pop("baseline", None)
    return TrainConfig.from_dict(values, source=str(path))


def point_config(base: TrainConfig, epsilon: float, seed: int, args) -> TrainConfig:
    config = base.with_overrides(SMOKE) if args.smoke else base
    overrides = {"dp.enabled": True, "dp.target_epsilon": epsilon, "dp.noise_multiplier": None, "run.seed": seed,
                 "run.test_every_epoch": True, "run.select": "last", "run.quiet": True, "data.root": args.data_root,
                 "run.runs_dir": str(args.out / "runs"), "run.run_name": f"eps{epsilon:g}_seed{seed}"}
    if args.device:
        overrides["run.device"] = args.device
    if args.smoke:
        overrides["optim.augmult"] = min(config.optim.augmult, 2)
        overrides["optim.warmup_epochs"] = min(config.optim.warmup_epochs, 1)
    return config.with_overrides(overrides)


def train_point(config: TrainConfig, folder: Path, deadline: float | None) -> str:
    """``finished`` (now or before) or ``paused`` (the job's ``run.max_minutes`` ended the sitting after an epoch
    whose successor would end past ``deadline``, ``time.monotonic()``); a started run continues from its checkpoint.
    Every sitting trains at least one epoch, and the last epoch of a run always finishes."""
    import shutil

    from dpvision.jobs.train import run

    if (folder / "summary.json").is_file():
        return "finished"
    limit = {} if deadline is None else {"run.max_minutes": max((deadline - time.monotonic()) / 60, 1e-3)}
    if (folder / "checkpoint.pt").exists():
        summary = run(resume=folder, overrides={"run.quiet": True, **limit}, announce=False)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # created but never checkpointed: nothing to keep
        summary = run(config.with_overrides(limit), group="", announce=False)
    return "paused" if summary.get("status") == "paused" else "finished"


def curve(config: TrainConfig, folder: Path) -> dict:
    """The run's per-epoch points: wall seconds so far (the sum of its epochs' seconds: training and the
    evaluations, over every sitting, without the start-up of each), example-views (steps x E[B] x max(1, K)),
    test accuracy and ε spent."""
    path, meta = folder / "metrics.csv", folder / "config.yaml"
    rows = []
    if path.is_file():
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    resolved = yaml.safe_load(meta.read_text()).get("resolved", {}) if meta.is_file() else {}
    n = resolved.get("num_train") or 0
    views_per_step = [float(r["sample_rate"]) * n * max(1, config.optim.augmult) for r in rows]
    seconds = itertools.accumulate(float(r["seconds"]) for r in rows)  # metrics.csv: each epoch's own seconds
    points = [{"epoch": int(r["epoch"]), "seconds": s, "steps": int(r["steps"]),
               "example_views": int(round(int(r["steps"]) * v)), "test_accuracy": float(r["test_accuracy"]),
               "epsilon": float(r["epsilon"])} for r, v, s in zip(rows, views_per_step, seconds)]
    return {"epochs_done": len(points), "points": points}


def time_to(points: list[dict], threshold: float) -> float | None:
    return next((p["seconds"] for p in points if p["test_accuracy"] >= threshold), None)


def figure(results: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for result in results:
        pts = result["points"]
        label = result.get("label", f"ε = {result['target_epsilon']:g}")
        label += "" if result["status"] == "finished" else " (so far)"
        axes[0].plot([p["seconds"] / 60 for p in pts], [p["test_accuracy"] for p in pts], marker=".", label=label)
        axes[1].plot([p["example_views"] for p in pts], [p["test_accuracy"] for p in pts], marker=".", label=label)
    axes[0].set_xlabel("wall time of the run (minutes)")
    axes[1].set_xlabel("example-views (steps × expected batch × augmentations)")
    axes[1].set_xscale("log")
    axes[0].set_ylabel("test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    return fig


def measure(args) -> dict:
    from dpvision.runs import atomic_write_bytes, atomic_write_json

    base = recipe(args.recipe)
    epsilons = list(SMOKE_EPSILONS if args.smoke else args.epsilons)
    started = time.monotonic()
    deadline = None if args.max_minutes is None else started + 60 * args.max_minutes
    results, out_of_time = [], False
    for epsilon in epsilons:
        for seed in range(args.seeds):
            config = point_config(base, epsilon, seed, args)
            folder = args.out / "runs" / config.run.run_name
            status = "not started"
            if not out_of_time or (folder / "summary.json").is_file():
                status = train_point(config, folder, deadline)
                out_of_time = out_of_time or status == "paused"
            results.append({"target_epsilon": epsilon, "seed": seed, "status": status, "run_dir": str(folder),
                            "epochs": config.optim.epochs, **curve(config, folder)})
            print(f"ε = {epsilon:g} seed {seed}: {status}, {results[-1]['epochs_done']}/{config.optim.epochs} "
                  "epochs", flush=True)
    report = {"smoke": args.smoke, "command": args.command, "recipe": str(args.recipe), "device": device_name(args),
              "complete": all(r["status"] == "finished" for r in results), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "time_to_accuracy.json", report)
    buffer = io.BytesIO()
    figure(results).savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(args.out / "time_to_accuracy.png", buffer.getvalue())
    print(("all points finished" if report["complete"] else
           "not finished: run the same command again to continue") + f"; results in {args.out}", flush=True)
    return report


def table(reports: list[dict]) -> str:
    """One row per run of every report (several when the points were sittings of different recipes)."""
    heads = " | ".join(f"time to {100 * t:g}%" for t in THRESHOLDS)
    devices = sorted({rep["device"] for rep in reports})
    lines = [f"Device: {', '.join(devices)}.", "",
             f"| target ε | seed | epochs done | final test accuracy | ε spent | wall seconds | example-views | "
             f"{heads} | recipe |", "|---" * (8 + len(THRESHOLDS)) + "|"]
    for rep in reports:
        for r in rep["results"]:
            last = r["points"][-1] if r["points"] else None
            times = " | ".join("—" if (s := time_to(r["points"], t)) is None else f"{s:.0f} s" for t in THRESHOLDS)
            lines.append(f"| {r['target_epsilon']:g} | {r['seed']} | {r['epochs_done']}/{r['epochs']}"
                         f"{'' if r['status'] == 'finished' else ' (' + r['status'] + ')'} | "
                         + (f"{100 * last['test_accuracy']:.2f}% | {last['epsilon']:.3f} | {last['seconds']:.0f} | "
                            f"{last['example_views']:,} | " if last else "— | — | — | — | ") + times
                         + f" | `{Path(rep['recipe']).name}` ({rep['folder']}) |")
    return "\n".join(lines) + "\n"


def shown(folder: Path) -> str:
    """A results folder as the docs name it: relative to benchmarks/results/ when it is under it."""
    try:
        return str(folder.resolve().relative_to(REPO / "benchmarks" / "results"))
    except ValueError:
        return folder.name


def write_docs(args) -> None:
    """docs/accuracy.md's table and figure from the report of every ``--out`` folder (one sitting's each)."""
    from accuracy_docs import marked

    from dpvision.runs import atomic_write_bytes, atomic_write_text

    reports = []
    for out in args.outs:
        path = out / "time_to_accuracy.json"
        if not path.is_file():
            raise ValueError(f"--write-docs: {path} does not exist; run the benchmark with --out {out} first")
        reports.append({**json.loads(path.read_text()), "folder": shown(out)})
        for r in reports[-1]["results"]:  # the figure tells the sittings' curves apart
            r["label"] = f"ε = {r['target_epsilon']:g}" + (f", {reports[-1]['folder']}" if len(args.outs) > 1 else "")
        if reports[-1]["smoke"] and Path(args.docs).resolve() == DOCS.resolve():
            raise ValueError(f"--write-docs: {out} holds --smoke results; give --docs OTHER.md to see them")
    picture = Path(args.docs).with_name(Path(args.docs).stem + "_cifar10_time.png")
    buffer = io.BytesIO()
    figure([r for rep in reports for r in rep["results"]]).savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(picture, buffer.getvalue())
    commands = "".join(rep["command"] + "\n" for rep in reports)
    body = "```\n" + commands + "```\n" + table(reports) + f"\n![time to accuracy]({picture.name})\n"
    atomic_write_text(args.docs, marked(Path(args.docs).read_text(encoding="utf-8"), MARKER, body))
    print(f"wrote {args.docs}")


def device_name(args) -> str:
    import torch

    if args.device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU, torch {torch.__version__}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="time_to_accuracy.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--recipe", type=Path, default=DEFAULT_RECIPE, help="the CIFAR-10 recipe (its dp target is replaced)")
    add("--epsilons", default=",".join(f"{e:g}" for e in EPSILONS), help="target ε list (default 1,2,4,8)")
    add("--seeds", type=int, default=1, help="seeds per ε (default 1: a point costs minutes)")
    add("--max-minutes", type=float, default=None, help="stop after the epoch whose successor would end past "
        "this many minutes of this invocation; run again to continue")
    add("--data-root", default="data", help="holds cifar-10-batches-py/")
    add("--device", default=None, choices=("auto", "cpu", "cuda"))
    add("--out", type=Path, action="append", default=None, help="default benchmarks/results/time_to_accuracy"
        "[_smoke]; with --write-docs it may be given several times (the sittings' folders, one table)")
    add("--smoke", action="store_true", help="a small CNN on a few hundred images: a CPU check")
    add("--write-docs", action="store_true", help="fill docs/accuracy.md's table from the JSON (no training)")
    add("--docs", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    args.outs = args.out or [REPO / "benchmarks" / "results" / ("time_to_accuracy_smoke" if args.smoke
                                                                 else "time_to_accuracy")]
    args.out = args.outs[0]
    args.command = "python benchmarks/time_to_accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return parser, args


def main(argv=None) -> int:
    from dpvision.cli_support import one_line_warnings
    from dpvision.jobs.errors import run_guarded

    parser, args = parse_args(argv)
    one_line_warnings()

    def work() -> None:
        args.epsilons = parse_list(args.epsilons, "--epsilons")
        if not all(0 < e < math.inf for e in args.epsilons) or not 1 <= args.seeds <= 100:
            raise ValueError("--epsilons must be positive numbers and --seeds between 1 and 100")
        if args.max_minutes is not None and not 0 < args.max_minutes < math.inf:
            raise ValueError(f"--max-minutes must be a positive number, got {args.max_minutes:g}")
        if len(args.outs) > 1 and not args.write_docs:
            raise ValueError("--out: one folder to train into (several only with --write-docs)")
        if args.write_docs:
            write_docs(args)
        else:
            measure(args)

    return run_guarded(parser, work)


if __name__ == "__main__":
    sys.exit(main())

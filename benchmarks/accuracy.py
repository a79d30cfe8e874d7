"""The privacy-utility benchmark (issues 9 and 24): honest tuning, the ε frontier, and one ablation table.

One dataset per invocation (``--dataset mnist|fashion-mnist|cifar10``, default mnist; see
``accuracy_plan.PROFILES``). Three phases, each resumable (a run that finished is skipped, an interrupted
one continues from its checkpoint; re-run the same command after a cut) and each writing JSON under
``--out`` (run folders there too; default ``benchmarks/results/accuracy`` for MNIST,
``benchmarks/results/accuracy_<dataset>`` otherwise):

* ``tune``: the candidate recipes of the dataset's grid (``benchmarks/accuracy_grid.yaml`` for MNIST,
  ``benchmarks/accuracy_grid_<dataset>.yaml`` otherwise) at the grid's target ε, judged on a validation
  split carved from the training set (``data.val_size``). The test set is never evaluated
  (``run.evaluate_test: false``; with a dpvision that lacks the option, the job's end-of-run test numbers
  are blanked in the run's ``summary.json`` before anything reads it). ``--budget-seconds`` drops the
  candidates whose estimated H100 seconds do not fit (``accuracy_plan.estimate_seconds``). Writes
  ``tune.json`` (every candidate, its validation accuracy, the number tried per ε, the best per ε) and
  ``tuned_eps<ε>.yaml``.
* ``frontier``: the tuned recipe (each ε takes the recipe tuned at the nearest tuned ε) at the dataset's
  frontier ε (``--epsilons``), 3 seeds (``--seeds``), with ``dpvision.jobs.sweep.sweep`` (σ calibrated to
  each ε; the test set evaluated once per run, at the end, on all training images); for MNIST also the
  seed's own defaults (``recipes/mnist_seed.yaml``, k = 30,000) and the no-DP point. Writes
  ``frontier.json`` and ``frontier.png``.
* ``ablation``: at ε = 3 (CIFAR-10: 8), the tuned recipe with each technique removed in turn. Writes
  ``ablation.json``.

``--write-docs`` fills the dataset's tables of ``docs/accuracy.md`` from the JSON files. ``--smoke``
shrinks everything (k, epochs, batch, seeds, grid) to check the script end to end on a CPU in minutes.

    python benchmarks/accuracy.py --phase all --data-root data --device cuda
    python benchmarks/accuracy.py --dataset fashion-mnist --phase all --budget-seconds 330 --device cuda
    python benchmarks/accuracy.py --write-docs
    python benchmarks/accuracy.py --phase all --smoke --data-root /tmp/tiny_mnist --device cpu
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import yaml
from accuracy_docs import DOCS, MAX_SECONDS_PER_POINT, PHASES, write_docs
from accuracy_plan import (MAX_CONFIGS, MAX_LIST, PROFILES, REPO, Grid, candidates, estimate_seconds, known_field,
                           load_grid, within_budget)

from dpvision.jobs.config import TrainConfig, load_recipe
from dpvision.jobs.features import FeatureStore
from dpvision.jobs.sweep import parse_list, refuse_sitting_limit, sweep

SEEDS = 3
# --smoke: every run shrinks to this (the tiny synthetic datasets of the tests have 600 training images).
# Batch sizes shrink by SMOKE_BATCH_DIVISOR (at least SMOKE_MIN_BATCH), so that large and small batches differ.
SMOKE = {"k": 300, "val_size": 100, "epochs": 1, "seeds": 1, "epsilons": (1.0, 3.0)}  # and 2 candidates
SMOKE_BATCH_DIVISOR, SMOKE_MIN_BATCH = 40, 8
NO_TEST = "run.evaluate_test"  # false: the job never evaluates the test set (older dpvision: blanked afterwards)
WITHHELD = ("tune phase: the test set is not used to choose (run.evaluate_test false; any test number blanked by "
            "benchmarks/accuracy.py)")


# ------------------------------------------------------------------------------------- configs of the runs
def shrink(config: TrainConfig, args) -> TrainConfig:
    """Under ``--smoke``: a few steps on a few hundred images; otherwise the config unchanged."""
    if not args.smoke:
        return config
    optim = config.optim
    return config.with_overrides({
        "data.k": SMOKE["k"], "data.val_size": SMOKE["val_size"] if config.data.val_size else 0,
        "optim.epochs": SMOKE["epochs"],
        "optim.batch_size": max(SMOKE_MIN_BATCH, optim.batch_size // SMOKE_BATCH_DIVISOR),
        "optim.warmup_epochs": min(optim.warmup_epochs, SMOKE["epochs"] / 2)})


def machine(config: TrainConfig, args) -> TrainConfig:
    """Where the data is and what runs it: changes no number of the recipe."""
    overrides = {"data.root": args.data_root, "run.quiet": True}
    if args.device:
        overrides["run.device"] = args.device
    return config.with_overrides(overrides)


def tune_config(grid: Grid, point: dict, epsilon: float, seed: int, args, runs_dir: Path, name: str) -> TrainConfig:
    """A candidate at one ε and seed: σ calibrated to ε, judged on validation, the test set never evaluated."""
    config = TrainConfig.from_dict(grid.base).with_overrides(point)
    config = config.with_overrides({"dp.enabled": True, "dp.target_epsilon": epsilon, "dp.noise_multiplier": None,
                                    "run.seed": seed, "run.runs_dir": str(runs_dir), "run.run_name": name,
                                    "run.test_every_epoch": False, "run.select": "last",
                                    **({NO_TEST: False} if known_field(NO_TEST) else {})})
    return machine(shrink(config, args), args)


def final_form(config: TrainConfig) -> TrainConfig:
    """A tuned recipe as the frontier trains it: every training image, no validation split, test once."""
    return config.with_overrides({"data.k": None, "data.val_size": 0, "run.test_every_epoch": False,
                                  "run.select": "last", "run.run_name": None, "run.runs_dir": "runs",
                                  "run.quiet": False, "run.device": "auto", "data.root": "data",
                                  **({NO_TEST: True} if known_field(NO_TEST) else {})})


def config_id(config: TrainConfig) -> str:
    """6 hex digits naming what a config trains (not where its data or run folder is)."""
    values = config.to_dict()
    for key in ("root", "download"):
        values["data"].pop(key, None)
    for key in ("runs_dir", "run_name", "quiet", "device", "tensorboard"):
        values["run"].pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:6]


def describe(config: TrainConfig) -> str:
    """``scatternet_cnn/tanh B2048 C0.1 lr4 e40 cosine ema0.999 augmult4``."""
    from dpvision.models.registry import DEFAULT_ACTIVATION

    m, o, d = config.model, config.optim, config.dp
    parts = [f"{m.name}/{m.activation or DEFAULT_ACTIVATION.get(m.name)}", f"B{o.batch_size}",
             f"C{d.max_grad_norm:g}", f"lr{o.lr:g}", f"e{o.epochs}",
             o.name + (f"/m{o.momentum:g}" if o.momentum else ""),
             o.schedule + (f"+warmup{o.warmup_epochs:g}" if o.warmup_epochs else "")]
    if o.ema_decay is not None:
        parts.append(f"ema{o.ema_decay:g}")
    if getattr(o, "augmult", 0):
        parts.append(f"augmult{o.augmult}")
    if getattr(m, "input_norm", "group") != "group":  # private: statistics released under DP (docs/privacy.md)
        parts.append(f"norm-{m.input_norm}{d.input_norm_settings()[0]:g}")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------- tune phase
def train_once(config: TrainConfig, folder: Path, features=None) -> None:
    """Run ``config`` into ``folder``, unless it finished there; continue it from a checkpoint if it was cut.

    ``features``: a :class:`dpvision.jobs.features.FeatureStore` shared by the runs of one invocation (the
    candidates of a grid train on the same split: a ScatterNet's features are computed once for all of them).
    """
    import shutil

    from dpvision.jobs.setup import Given
    from dpvision.jobs.train import run

    if (folder / "summary.json").is_file():
        return
    given = Given(features=features)
    if (folder / "checkpoint.pt").exists():
        run(resume=folder, overrides={"run.quiet": True}, announce=False, given=given)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # created but never checkpointed: nothing to keep
        run(config, group="", announce=False, given=given)


def withhold_test(folder: Path) -> dict:
    """Blank the test numbers the job wrote into ``summary.json`` (idempotent); the summary without them."""
    from dpvision.runs import atomic_write_json

    path = folder / "summary.json"
    summary = json.loads(path.read_text())
    if summary.get("test_withheld") != WITHHELD:
        for key in list(summary):
            if key.startswith(("test_accuracy", "test_loss")):
                summary[key] = None
        summary["test_withheld"] = WITHHELD
        atomic_write_json(path, summary)
    return summary


def last_val_accuracy(folder: Path) -> float:
    with open(folder / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return float(rows[-1]["val_accuracy"])


def phase_tune(args) -> dict:
    from dpvision.jobs.features import FeatureStore
    from dpvision.runs import atomic_write_text

    grid = load_grid(args.grid)
    dataset = TrainConfig.from_dict(grid.base).data.dataset
    if dataset != args.dataset:
        raise ValueError(f"--grid {args.grid}: base data.dataset is {dataset}, not --dataset {args.dataset}")
    points = candidates(grid, args.max_configs or grid.max_configs, smoke=args.smoke)
    seeds = grid.seeds[:SMOKE["seeds"]] if args.smoke else grid.seeds
    kept, costs = budgeted(grid, points, len(seeds), args)
    runs_dir = args.out / "tune" / "runs"
    todo = []
    for epsilon in grid.epsilons:
        for index in kept:
            point = points[index]
            for seed in seeds:
                probe = tune_config(grid, point, epsilon, seed, args, runs_dir, "probe")
                name = f"eps{epsilon:g}_c{index:02d}_{config_id(probe)}_seed{seed}"
                todo.append((epsilon, index, point, seed, replace(probe, run=replace(probe.run, run_name=name))))
    if not known_field(NO_TEST):
        print(f"note: this dpvision has no {NO_TEST}: each tune run evaluates the test set at its end; those "
              "numbers are blanked in its summary.json before anything reads it", flush=True)
    print(f"tune: {len(kept)} candidates of {grid.size} x {len(grid.epsilons)} ε x {len(seeds)} seed(s) = "
          f"{len(todo)} runs, judged on the validation split", flush=True)
    results, features = [], FeatureStore()
    for i, (epsilon, index, point, seed, config) in enumerate(todo, start=1):
        folder = runs_dir / config.run.run_name
        done = (folder / "summary.json").is_file()
        train_once(config, folder, features)
        summary = withhold_test(folder)
        result = {"epsilon_target": epsilon, "candidate": index, "seed": seed, "name": config.run.run_name,
                  "overrides": point, "recipe": describe(config), "val_accuracy": last_val_accuracy(folder),
                  "epsilon": summary["epsilon"], "epsilons": summary["epsilons"],
                  "noise_multiplier": summary["noise_multiplier"], "wall_seconds": summary["wall_seconds"],
                  "num_train": summary["num_train"], "num_val": summary["num_val"]}
        results.append(result)
        print(f"[{i}/{len(todo)}] ε={epsilon:g} c{index:02d} {result['recipe']}: val acc "
              f"{result['val_accuracy']:.4f}, ε {summary['epsilon']:.4g}, {summary['wall_seconds']:.1f}s"
              f"{' (done earlier)' if done else ''}", flush=True)
    report = tune_report(grid, points, kept, seeds, results, args)
    report["estimated_seconds"] = costs
    write_json(args.out / "tune.json", report)
    for epsilon, best in report["best"].items():
        config = TrainConfig.from_dict(best["config"])
        header = (f"# Tuned by benchmarks/accuracy.py on {args.dataset}'s validation split at target ε = {epsilon}: "
                  f"best of {report['configs_tried'][epsilon]} configurations (validation accuracy "
                  f"{best['val_accuracy']:.4f}).\n#   dpvision train --config THIS_FILE --data-root data\n")
        atomic_write_text(args.out / f"tuned_eps{epsilon}.yaml",
                          header + yaml.safe_dump(config.to_dict(), sort_keys=False))
    print_table(["target ε", "configs tried", "best val acc", "best recipe"],
                [[e, report["configs_tried"][e], f"{b['val_accuracy']:.4f}", b["recipe"]]
                 for e, b in report["best"].items()])
    return report


def budgeted(grid: Grid, points: list[dict], seeds: int, args) -> tuple[list[int], list[float]]:
    """The indices of the candidates that fit ``--budget-seconds`` (estimated H100 seconds) and each one's
    estimate for one tune run; with ``--phase all`` the frontier's runs of the costliest kept one must fit too."""
    configs = [TrainConfig.from_dict(grid.base).with_overrides(p) for p in points]
    # A paused tune run would have no summary to judge.
    refuse_sitting_limit(configs, why="the benchmark trains whole runs (leave it out)", where=f"--grid {args.grid}: ")
    size = PROFILES[args.dataset].train_size
    tune_costs = [estimate_seconds(c, size) for c in configs]
    final_costs = [estimate_seconds(final_form(c), size) for c in configs]
    reserve = len(args.epsilons) * args.seeds * (2 if args.baseline else 1) if args.phase == "all" else 0
    keep = within_budget(tune_costs, final_costs, len(grid.epsilons) * seeds, reserve,
                         None if args.smoke else args.budget_seconds)
    for i, (point, cost, fits) in enumerate(zip(configs, tune_costs, keep)):
        print(f"candidate c{i:02d}: {describe(point)}: ~{cost:.0f} s a run on an H100"
              f"{'' if fits else ' -- dropped: does not fit --budget-seconds'}", flush=True)
    kept = [i for i, fits in enumerate(keep) if fits]
    if not kept:
        raise ValueError(f"--budget-seconds {args.budget_seconds:g}: no candidate of {args.grid} fits")
    spent = sum(tune_costs[i] for i in kept) * len(grid.epsilons) * seeds
    print(f"tune: estimated {spent:.0f} s on an H100 for {len(kept)} of {len(points)} candidates"
          + (f" (+ {reserve} final runs reserved)" if reserve else ""), flush=True)
    return kept, tune_costs


def tune_report(grid: Grid, points: list[dict], kept: list[int], seeds: list[int], results: list[dict],
                args) -> dict:
    """tune.json: every run, the number of configurations tried per ε, the best per ε (mean over seeds)."""
    best, tried = {}, {}
    for epsilon in grid.epsilons:
        mine = [r for r in results if r["epsilon_target"] == epsilon]
        means = {i: statistics.fmean(r["val_accuracy"] for r in mine if r["candidate"] == i) for i in kept}
        tried[f"{epsilon:g}"] = len(means)
        top = max(means, key=lambda i: (means[i], -i))  # ties: the first candidate
        config = final_form(TrainConfig.from_dict(grid.base).with_overrides(points[top]))
        config = config.with_overrides({"dp.target_epsilon": epsilon, "dp.noise_multiplier": None, "dp.enabled": True})
        best[f"{epsilon:g}"] = {"candidate": top, "val_accuracy": means[top], "overrides": points[top],
                                "recipe": describe(config), "config": config.to_dict()}
    return {"phase": "tune", "smoke": args.smoke, "command": args.command, "device": device_name(args),
            "grid_file": shown(args.grid), "search_space_size": grid.size, "configs_tried": tried,
            "seeds": seeds, "selection": "validation accuracy after the last epoch (mean over seeds), "
            f"{results[0]['num_val'] if results else 0} validation images carved from the training set",
            "test_set": f"not evaluated ({NO_TEST}: false)" if known_field(NO_TEST) else
            "not used: the job's end-of-run test numbers are blanked in every tune run's summary.json",
            "budget_seconds": None if args.smoke else args.budget_seconds,
            "dropped_by_budget": [i for i in range(len(points)) if i not in kept], "best": best, "runs": results}


# ----------------------------------------------------------------------------------------- frontier phase
def chosen_recipes(args) -> dict[float | None, TrainConfig]:
    """``{tuned ε: recipe}`` from ``tune.json``, or ``{None: recipe}`` from ``--recipe`` (one recipe for every ε)."""
    if args.recipe:
        return {None: final_form(TrainConfig.from_dict(load_recipe(args.recipe), source=str(args.recipe)))}
    path = args.out / "tune.json"
    if not path.is_file():
        raise ValueError(f"no {path}: run --phase tune first, or give --recipe FILE")
    tune = json.loads(path.read_text())
    return {float(e): TrainConfig.from_dict(b["config"]) for e, b in tune["best"].items()}


def same_recipe(config: TrainConfig) -> str:
    """What a recipe trains, apart from its ε target (a sweep sets that per point), as comparable text."""
    plain = config.with_overrides({"dp.target_epsilon": None, "dp.noise_multiplier": None}).to_dict()
    return json.dumps(plain, sort_keys=True, default=str)


def recipe_for(epsilon: float, recipes: dict[float | None, TrainConfig]) -> float | None:
    """The tuned ε whose recipe trains ``epsilon``: the nearest on a log scale (ties: the larger)."""
    if len(recipes) == 1:
        return next(iter(recipes))
    return min(recipes, key=lambda t: (abs(math.log(epsilon / t)), -t))


def frontier_sweep(config: TrainConfig, label: str, epsilons, seeds, out: Path, baseline: bool, args,
                   features: FeatureStore | None = None) -> list[dict]:
    """``features``: a store the frontier's recipes share (a ScatterNet's features computed once per split)."""
    base = machine(shrink(config, args), args)
    rows = sweep(base, epsilons=epsilons, seeds=seeds, out=out, baseline=baseline, command=args.command,
                 features=features)
    return [{**row, "value": label} for row in rows]


def seed_defaults_sweep(args, epsilons: list[float], seeds: list[int], parts: list[dict]) -> list[dict]:
    """The seed's own defaults (MNIST: ``recipes/mnist_seed.yaml``) on the frontier, for comparison."""
    path = args.seed_recipe
    seed = TrainConfig.from_dict(load_recipe(path), source=str(path)).with_overrides({"run.test_every_epoch": False})
    print(f"frontier: the seed's defaults ({describe(seed)}, k = {seed.data.k})", flush=True)
    out = args.out / "frontier" / "seed_defaults"
    rows = frontier_sweep(seed, "seed defaults", epsilons, seeds, out, False, args)
    parts.append({"label": "seed defaults", "folder": str(out), "epsilons": epsilons, "recipe": describe(seed),
                  "same_recipe": same_recipe(machine(shrink(seed, args), args))})
    return rows


def phase_frontier(args) -> dict:
    from dpvision.jobs.sweep_report import frontier_figure
    from dpvision.runs import atomic_write_bytes

    epsilons = list(SMOKE["epsilons"] if args.smoke else args.epsilons)
    seeds = list(range(SMOKE["seeds"] if args.smoke else args.seeds))
    recipes = chosen_recipes(args)
    first, tuned_at = {}, {}  # one sweep per distinct recipe: the ε it was tuned at first names it
    for tuned in sorted(recipes, key=lambda t: -1 if t is None else t):
        first.setdefault(same_recipe(recipes[tuned]), tuned)
        tuned_at.setdefault(first[same_recipe(recipes[tuned])], []).append(tuned)
    groups: dict[float | None, list[float]] = {}
    for epsilon in epsilons:
        groups.setdefault(first[same_recipe(recipes[recipe_for(epsilon, recipes)])], []).append(epsilon)
    with_baseline = first[same_recipe(recipes[recipe_for(args.ablation_epsilon, recipes)])]
    rows, parts, features = [], [], FeatureStore()
    for tuned, eps in groups.items():
        name = "recipe" if tuned is None else f"tuned_eps{tuned:g}"
        out = args.out / "frontier" / name
        print(f"frontier: {name} ({describe(recipes[tuned])}) at ε {', '.join(f'{e:g}' for e in eps)}", flush=True)
        got = frontier_sweep(recipes[tuned], "tuned", eps, seeds, out, args.baseline and tuned == with_baseline,
                             args, features)
        rows += got
        parts.append({"label": "tuned", "folder": str(out), "tuned_at": None if tuned is None else tuned_at[tuned],
                      "epsilons": eps, "recipe": describe(recipes[tuned]),
                      "same_recipe": same_recipe(machine(shrink(recipes[tuned], args), args))})
    if args.seed_recipe:
        rows += seed_defaults_sweep(args, epsilons, seeds, parts)
    buffer = io.BytesIO()
    frontier_figure(rows, vary="recipe").savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(args.out / "frontier.png", buffer.getvalue())
    report = {"phase": "frontier", "smoke": args.smoke, "command": args.command, "device": device_name(args),
              "seeds": seeds, "epsilons": epsilons, "sweeps": parts, "points": summarize_points(rows),
              "rows": rows}
    write_json(args.out / "frontier.json", report)
    print_table(["recipe", "target ε", "test acc (mean ± sd)", "n", "ε rdp / prv / pld", "s per run (max)"],
                [[p["recipe"], p["target_epsilon"], f"{p['mean']:.4f} ± {p['sd']:.4f}", p["n"],
                  " / ".join(f"{p[f'epsilon_{a}']:.3g}" for a in ("rdp", "prv", "pld")),
                  f"{p['seconds_mean']:.1f} ({p['seconds_max']:.1f})"] for p in report["points"]])
    return report


def summarize_points(rows: list[dict]) -> list[dict]:
    """Mean ± sd of test accuracy per (recipe, ε); the largest ε under each accountant; seconds per run."""
    points = []
    def key(row):  # the tuned recipe first, then by ε
        return row["value"] != "tuned", row["value"], float(row["target_epsilon"])

    for (_, label, epsilon), group in itertools.groupby(sorted(rows, key=key), key=key):
        group = list(group)
        accuracy = [float(r["test_accuracy"]) for r in group]
        seconds = [float(r["wall_seconds"]) for r in group]
        points.append({"recipe": label, "target_epsilon": epsilon, "n": len(group), "mean": statistics.fmean(accuracy),
                       "sd": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                       **{f"epsilon_{a}": max(float(r[f"epsilon_{a}"]) for r in group) for a in ("rdp", "prv", "pld")},
                       "seconds_mean": statistics.fmean(seconds), "seconds_max": max(seconds),
                       "within_time_target": max(seconds) <= MAX_SECONDS_PER_POINT})
    return points


# ----------------------------------------------------------------------------------------- ablation phase
def ablations(config: TrainConfig) -> list[tuple[str, str, dict | None]]:
    """``(variant, change, overrides)`` in order; overrides None (change: why) when the recipe lacks the technique."""
    from dpvision.models.registry import DEFAULT_ACTIVATION

    m, o = config.model, config.optim
    activation = m.activation or DEFAULT_ACTIVATION.get(m.name)
    augmult = getattr(o, "augmult", 0)
    # The plain CNN keeps the recipe's activation (a linear head has none: the CNN's default, relu); it has no
    # frozen features to cache, so an explicit run.cache_features: true goes back to auto.
    plain = {"model.name": "sample_convnet", "model.activation": activation or DEFAULT_ACTIVATION["sample_convnet"]}
    if config.run.cache_features is True:
        plain["run.cache_features"] = "auto"
    rows = [
        ("activation -> relu", activation not in (None, "relu"), f"model.activation: {activation} -> relu",
         {"model.activation": "relu"}, f"model.activation is {activation}"),
        ("ScatterNet -> plain CNN", m.name.startswith("scatternet"),
         f"model.name: {m.name} -> sample_convnet ({plain['model.activation']})", plain, f"model.name is {m.name}"),
        ("EMA off", o.ema_decay is not None, f"optim.ema_decay: {o.ema_decay} -> null", {"optim.ema_decay": None},
         "optim.ema_decay is null"),
        ("schedule -> constant", o.schedule != "constant" or o.warmup_epochs > 0,
         f"optim.schedule: {o.schedule}, warm-up {o.warmup_epochs:g} epochs -> constant, no warm-up",
         {"optim.schedule": "constant", "optim.warmup_epochs": 0}, "optim.schedule is constant, no warm-up"),
        ("augmult off", augmult > 0, f"optim.augmult: {augmult} -> 0", {"optim.augmult": 0}, "optim.augmult is 0"),
        ("large batch -> 256", o.batch_size > 256, f"optim.batch_size: {o.batch_size} -> 256 (σ recalibrated)",
         {"optim.batch_size": 256}, f"optim.batch_size is {o.batch_size}"),
    ]
    out = []
    for variant, used, change, overrides, otherwise in rows:
        if not all(known_field(k) for k in overrides):
            out.append((variant, "not a setting of this dpvision", None))
        else:
            out.append((variant, change, overrides) if used else (variant, f"not used ({otherwise})", None))
    return out


def reused_full_rows(config: TrainConfig, args, seeds: list[int]) -> list[dict] | None:
    """The frontier's runs of exactly this recipe at ε = 3 (same seeds), if the frontier phase made them."""
    path = args.out / "frontier.json"
    if not path.is_file():
        return None
    frontier = json.loads(path.read_text())
    wanted = same_recipe(machine(shrink(config, args), args))
    for part in frontier["sweeps"]:
        if part["label"] == "tuned" and part["same_recipe"] == wanted:
            rows = [r for r in frontier["rows"] if r["run_dir"].startswith(part["folder"] + "/")
                    and r["target_epsilon"] == args.ablation_epsilon and r["seed"] in seeds]
            if len(rows) == len(seeds):
                return rows
    return None


def phase_ablation(args) -> dict:
    recipes = chosen_recipes(args)
    full = recipes[recipe_for(args.ablation_epsilon, recipes)]
    seeds = list(range(SMOKE["seeds"] if args.smoke else args.seeds))
    print(f"ablation at ε = {args.ablation_epsilon:g}: {describe(full)}", flush=True)
    results = []
    variants = [("full recipe", "", {})] + ablations(full)
    for variant, change, overrides in variants:
        if overrides is None:
            results.append({"variant": variant, "change": "", "skipped": change})
            print(f"ablation: {variant}: skipped, {change}", flush=True)
            continue
        rows = reused_full_rows(full, args, seeds) if not overrides else None
        source = "frontier phase" if rows else "this phase"
        if rows is None:
            folder = args.out / "ablation" / variant.replace(" -> ", "_to_").replace(" ", "_")
            print(f"ablation: {variant} ({change or 'as tuned'})", flush=True)
            rows = frontier_sweep(full.with_overrides(overrides), variant, [args.ablation_epsilon], seeds, folder,
                                  False, args)
        accuracy = [float(r["test_accuracy"]) for r in rows]
        results.append({"variant": variant, "change": change, "runs_from": source, "n": len(rows),
                        "mean": statistics.fmean(accuracy), "sd": statistics.stdev(accuracy) if len(rows) > 1 else 0.0,
                        "rows": rows})
    full_mean = results[0]["mean"]
    for result in results:
        if "mean" in result:
            result["delta_vs_full"] = result["mean"] - full_mean
    report = {"phase": "ablation", "smoke": args.smoke, "command": args.command, "device": device_name(args),
              "epsilon": args.ablation_epsilon, "seeds": seeds, "recipe": describe(full), "variants": results}
    write_json(args.out / "ablation.json", report)
    print_table(["variant", "change", "test acc (mean ± sd)", "Δ vs full"],
                [[r["variant"], r["change"], f"{r['mean']:.4f} ± {r['sd']:.4f}" if "mean" in r else "skipped",
                  f"{r['delta_vs_full']:+.4f}" if "mean" in r else ""] for r in results])
    return report


# ---------------------------------------------------------------------------------------------------- main
def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it (as the docs cite it)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def device_name(args) -> str:
    import platform

    import torch

    if args.device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}"


def write_json(path: Path, report: dict) -> None:
    from dpvision.runs import atomic_write_json

    atomic_write_json(path, report)
    print(f"wrote {path}", flush=True)


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="accuracy.py", description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--phase", choices=(*PHASES, "all"), default=None, help="which phase to run")
    add("--dataset", choices=tuple(PROFILES), default="mnist", help="which dataset's benchmark (default mnist)")
    add("--write-docs", action="store_true", help="fill the dataset's tables of --docs from the JSON files")
    add("--smoke", action="store_true", help="tiny everything: a CPU check in minutes")
    add("--data-root", default="data", help="holds MNIST/raw/, FashionMNIST/raw/ or cifar-10-batches-py/")
    add("--device", default=None, choices=("auto", "cpu", "cuda"), help="run.device (default: auto)")
    add("--out", type=Path, default=None, help="results folder (default: benchmarks/results/accuracy for MNIST, "
        "accuracy_<dataset> otherwise; with --smoke accuracy_smoke[_<dataset>])")
    add("--grid", type=Path, default=None, help="tune phase: the candidate recipes (default: the dataset's grid)")
    add("--max-configs", type=int, default=None, help="tune phase: candidates per ε (default: the grid's max_configs)")
    add("--budget-seconds", type=float, default=None, help="tune phase: keep only the candidates whose estimated "
        "H100 seconds fit (with --phase all, the frontier's runs of the costliest kept one too)")
    add("--recipe", type=Path, default=None, help="frontier/ablation: this recipe instead of tune.json")
    add("--epsilons", default=None, help="frontier: target ε list, e.g. 1,3,8 (default: the dataset's)")
    add("--seeds", type=int, default=SEEDS, help=f"frontier/ablation: seeds per point (default {SEEDS}; "
        "tune: the grid's seeds)")
    add("--no-seed-defaults", action="store_true", help="frontier: skip the seed's defaults (MNIST)")
    add("--no-baseline", action="store_true", help="frontier: skip the no-DP point (MNIST)")
    add("--docs", type=Path, default=DOCS, help="--write-docs: the page to fill (default docs/accuracy.md)")
    args = parser.parse_args(argv)
    if args.phase is None and not args.write_docs:
        parser.error("give --phase tune|frontier|ablation|all and/or --write-docs")
    profile = PROFILES[args.dataset]
    suffix = "" if args.dataset == "mnist" else f"_{args.dataset}"
    args.out = args.out or REPO / "benchmarks" / "results" / ("accuracy_smoke" + suffix if args.smoke else profile.out)
    args.grid = args.grid or profile.grid
    args.seed_recipe = None if args.no_seed_defaults else profile.seed_recipe
    args.baseline = profile.baseline and not args.no_baseline
    args.ablation_epsilon = max(profile.targets)
    args.command = "python benchmarks/accuracy.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return parser, args


def main(argv=None) -> int:
    from dpvision.cli_support import one_line_warnings
    from dpvision.jobs.errors import run_guarded

    parser, args = parse_args(argv)
    one_line_warnings()

    def work() -> None:
        if not 1 <= args.seeds <= 100:
            raise ValueError(f"--seeds must be between 1 and 100, got {args.seeds}")
        if args.max_configs is not None and not 1 <= args.max_configs <= MAX_CONFIGS:
            raise ValueError(f"--max-configs must be between 1 and {MAX_CONFIGS}, got {args.max_configs}")
        if args.budget_seconds is not None and not 0 < args.budget_seconds < math.inf:
            raise ValueError(f"--budget-seconds must be a positive number, got {args.budget_seconds:g}")
        args.epsilons = (parse_list(args.epsilons, "--epsilons") if args.epsilons
                         else list(PROFILES[args.dataset].frontier_epsilons))
        if not all(0 < e < math.inf for e in args.epsilons) or len(args.epsilons) > MAX_LIST:
            raise ValueError(f"--epsilons must be at most {MAX_LIST} positive numbers, got {args.epsilons}")
        started = time.perf_counter()
        if args.phase:
            args.out.mkdir(parents=True, exist_ok=True)
        for phase in (PHASES if args.phase == "all" else [args.phase] if args.phase else []):
            {"tune": phase_tune, "frontier": phase_frontier, "ablation": phase_ablation}[phase](args)
        if args.phase:
            print(f"done in {time.perf_counter() - started:.0f}s; results in {args.out}", flush=True)
        if args.write_docs:
            write_docs(args, PROFILES[args.dataset])

    return run_guarded(parser, work)


if __name__ == "__main__":
    sys.exit(main())

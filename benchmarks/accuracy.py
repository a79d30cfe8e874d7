"""The MNIST privacy-utility benchmark of issue 9: honest tuning, the ε frontier, and one ablation table.

Three phases, each resumable (a run that finished is skipped, an interrupted one continues from its
checkpoint) and each writing JSON under ``--out`` (run folders there too):

* ``tune``: the candidate recipes of ``benchmarks/accuracy_grid.yaml`` at target ε 1 and 3, judged on a
  validation split carved from MNIST's training set (``data.val_size``). The test set is never
  evaluated (``run.evaluate_test: false``; with a dpvision that lacks the option, the job's end-of-run
  test numbers are blanked in the run's ``summary.json`` before anything reads it). Writes ``tune.json`` (every candidate, its
  validation accuracy, the number tried per ε, the best per ε) and ``tuned_eps<ε>.yaml``.
* ``frontier``: the tuned recipe (each ε takes the recipe tuned at the nearest tuned ε) and the seed's
  own defaults (``recipes/mnist_seed.yaml``, k = 30,000) at ε ∈ {0.5, 1, 2, 3, 8}, 3 seeds, with
  ``dpvision.jobs.sweep.sweep`` (σ calibrated to each ε; the test set evaluated once, at the end).
  The tuned recipe trains on all 60,000 training images. Writes ``frontier.json`` and ``frontier.png``.
* ``ablation``: at ε = 3, the tuned recipe with each technique removed in turn, 3 seeds. Writes
  ``ablation.json``.

``--write-docs`` fills the tables of ``docs/accuracy.md`` from the JSON files. ``--smoke`` shrinks
everything (k, epochs, batch, seeds, grid) to check the script end to end on a CPU in minutes.

    python benchmarks/accuracy.py --phase all --data-root data --device cuda
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
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from dpvision.jobs.config import SECTIONS, RecipeLoader, TrainConfig, load_recipe
from dpvision.jobs.sweep import sweep

REPO = Path(__file__).resolve().parents[1]
GRID_FILE = REPO / "benchmarks" / "accuracy_grid.yaml"
SEED_RECIPE = REPO / "recipes" / "mnist_seed.yaml"
DOCS = REPO / "docs" / "accuracy.md"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "accuracy"
SMOKE_OUT = REPO / "benchmarks" / "results" / "accuracy_smoke"
PHASES = ("tune", "frontier", "ablation")
FRONTIER_EPSILONS = (0.5, 1.0, 2.0, 3.0, 8.0)
ABLATION_EPSILON = 3.0
SEEDS = 3
MAX_SECONDS_PER_POINT = 120.0  # the target: an ε point trains in at most 2 minutes on one H100
TARGETS = {3.0: 0.985, 1.0: 0.975}  # the mean test accuracy targets (3 seeds, δ = 1e-5)
# --smoke: every run shrinks to this (the tiny synthetic MNIST has 600 training images).
# Batch sizes shrink by SMOKE_BATCH_DIVISOR (at least SMOKE_MIN_BATCH), so that large and small batches differ.
SMOKE = {"k": 300, "val_size": 100, "epochs": 1, "seeds": 1, "epsilons": (1.0, 3.0)}  # and 2 candidates
SMOKE_BATCH_DIVISOR, SMOKE_MIN_BATCH = 40, 8
MAX_LIST, MAX_CONFIGS, MAX_GRID = 100, 10_000, 1_000_000  # bounds on a grid file: bounded work and memory
NO_TEST = "run.evaluate_test"  # false: the job never evaluates the test set (older dpvision: blanked afterwards)
WITHHELD = ("tune phase: the test set is not used to choose (run.evaluate_test false; any test number blanked by "
            "benchmarks/accuracy.py)")


# ----------------------------------------------------------------------------------------------- the grid
@dataclass(kw_only=True)
class Grid:
    epsilons: list[float]
    seeds: list[int]
    max_configs: int
    sample_seed: int
    base: dict  # a partial recipe
    axes: list[tuple[str, list[dict]]]  # (axis name, [{"section.field": value, ...} per choice])
    size: int  # of the full product


def known_field(key: str) -> bool:
    section, _, name = key.partition(".")
    return section in SECTIONS and name in {f.name for f in fields(SECTIONS[section])}


def load_grid(path: Path) -> Grid:
    """The grid file; axes naming a field this dpvision lacks are dropped with a printed note."""
    try:
        spec = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=RecipeLoader)  # noqa: S506 (safe)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--grid {path}: cannot read ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("axes"), dict) or not spec["axes"]:
        raise ValueError(f"--grid {path}: needs a mapping with epsilons, seeds, max_configs, base and axes")
    axes = []
    for name, values in spec["axes"].items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"--grid {path}: axis {name} must be a non-empty list")
        choices = [dict(v) if isinstance(v, dict) else {name: v} for v in values]
        unknown = sorted({key for choice in choices for key in choice if not known_field(key)})
        if unknown:
            print(f"note: grid axis {name} skipped: {', '.join(unknown)} is not a setting of this dpvision")
            continue
        axes.append((name, choices))
    TrainConfig.from_dict(spec.get("base") or {}, source=f"--grid {path} base")  # fails early, names the field
    grid = Grid(epsilons=spec.get("epsilons", [1, 3]), seeds=spec.get("seeds", [0]),
                max_configs=spec.get("max_configs", 24), sample_seed=spec.get("sample_seed", 0),
                base=spec.get("base") or {}, axes=axes, size=math.prod(len(c) for _, c in axes))
    check(isinstance(grid.epsilons, list) and 1 <= len(grid.epsilons) <= MAX_LIST
          and all(isinstance(e, (int, float)) and 0 < e < math.inf for e in grid.epsilons),
          path, "epsilons", f"a list of 1 to {MAX_LIST} positive numbers", grid.epsilons)
    grid.epsilons = [float(e) for e in grid.epsilons]
    check(isinstance(grid.seeds, list) and 1 <= len(grid.seeds) <= MAX_LIST
          and all(isinstance(x, int) and x >= 0 for x in grid.seeds), path, "seeds",
          f"a list of 1 to {MAX_LIST} integers >= 0", grid.seeds)
    check(isinstance(grid.max_configs, int) and 1 <= grid.max_configs <= MAX_CONFIGS, path, "max_configs",
          f"an integer in [1, {MAX_CONFIGS}]", grid.max_configs)
    check(isinstance(grid.sample_seed, int), path, "sample_seed", "an integer", grid.sample_seed)
    check(grid.size <= MAX_GRID, path, "axes", f"a product of at most {MAX_GRID} combinations", grid.size)
    return grid


def check(ok: bool, path: Path, key: str, valid: str, value) -> None:
    if not ok:
        raise ValueError(f"--grid {path}: {key} must be {valid}, got {value!r}")


def candidates(grid: Grid, max_configs: int, *, smoke: bool = False) -> list[dict]:
    """``max_configs`` points of the axes' product (seeded sample, in product order), each ``{field: value}``.

    ``smoke``: the first and the last point instead (every axis's first value, then every axis's last).
    """
    product = list(itertools.product(*(choices for _, choices in grid.axes)))
    if smoke:
        product = [product[0], product[-1]] if len(product) > 1 else product
    elif len(product) > max_configs:
        keep = sorted(random.Random(grid.sample_seed).sample(range(len(product)), max_configs))
        product = [product[i] for i in keep]
    return [{k: v for choice in point for k, v in choice.items()} for point in product]


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
    return " ".join(parts)


# --------------------------------------------------------------------------------------------- tune phase
def train_once(config: TrainConfig, folder: Path) -> None:
    """Run ``config`` into ``folder``, unless it finished there; continue it from a checkpoint if it was cut."""
    import shutil

    from dpvision.jobs.train import run

    if (folder / "summary.json").is_file():
        return
    if (folder / "checkpoint.pt").exists():
        run(resume=folder, overrides={"run.quiet": True}, announce=False)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # created but never checkpointed: nothing to keep
        run(config, group="", announce=False)


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
    from dpvision.runs import atomic_write_text

    grid = load_grid(args.grid)
    points = candidates(grid, args.max_configs or grid.max_configs, smoke=args.smoke)
    seeds = grid.seeds[:SMOKE["seeds"]] if args.smoke else grid.seeds
    runs_dir = args.out / "tune" / "runs"
    todo = []
    for epsilon in grid.epsilons:
        for index, point in enumerate(points):
            for seed in seeds:
                probe = tune_config(grid, point, epsilon, seed, args, runs_dir, "probe")
                name = f"eps{epsilon:g}_c{index:02d}_{config_id(probe)}_seed{seed}"
                todo.append((epsilon, index, point, seed, replace(probe, run=replace(probe.run, run_name=name))))
    if not known_field(NO_TEST):
        print(f"note: this dpvision has no {NO_TEST}: each tune run evaluates the test set at its end; those "
              "numbers are blanked in its summary.json before anything reads it", flush=True)
    print(f"tune: {len(points)} candidates of {grid.size} x {len(grid.epsilons)} ε x {len(seeds)} seed(s) = "
          f"{len(todo)} runs, judged on the validation split", flush=True)
    results = []
    for i, (epsilon, index, point, seed, config) in enumerate(todo, start=1):
        folder = runs_dir / config.run.run_name
        done = (folder / "summary.json").is_file()
        train_once(config, folder)
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
    report = tune_report(grid, points, seeds, results, args)
    write_json(args.out / "tune.json", report)
    for epsilon, best in report["best"].items():
        config = TrainConfig.from_dict(best["config"])
        header = (f"# Tuned by benchmarks/accuracy.py on MNIST's validation split at target ε = {epsilon}: "
                  f"best of {report['configs_tried'][epsilon]} configurations (validation accuracy "
                  f"{best['val_accuracy']:.4f}).\n#   dpvision train --config THIS_FILE --data-root data\n")
        atomic_write_text(args.out / f"tuned_eps{epsilon}.yaml",
                          header + yaml.safe_dump(config.to_dict(), sort_keys=False))
    print_table(["target ε", "configs tried", "best val acc", "best recipe"],
                [[e, report["configs_tried"][e], f"{b['val_accuracy']:.4f}", b["recipe"]]
                 for e, b in report["best"].items()])
    return report


def tune_report(grid: Grid, points: list[dict], seeds: list[int], results: list[dict], args) -> dict:
    """tune.json: every run, the number of configurations tried per ε, the best per ε (mean over seeds)."""
    best, tried = {}, {}
    for epsilon in grid.epsilons:
        mine = [r for r in results if r["epsilon_target"] == epsilon]
        means = {i: statistics.fmean(r["val_accuracy"] for r in mine if r["candidate"] == i)
                 for i in range(len(points))}
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
            "best": best, "runs": results}


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


def frontier_sweep(config: TrainConfig, label: str, epsilons, seeds, out: Path, baseline: bool, args) -> list[dict]:
    base = machine(shrink(config, args), args)
    rows = sweep(base, epsilons=epsilons, seeds=seeds, out=out, baseline=baseline, command=args.command)
    return [{**row, "value": label} for row in rows]


def phase_frontier(args) -> dict:
    from dpvision.jobs.sweep_report import frontier_figure
    from dpvision.runs import atomic_write_bytes

    epsilons = list(SMOKE["epsilons"] if args.smoke else FRONTIER_EPSILONS)
    seeds = list(range(SMOKE["seeds"] if args.smoke else args.seeds))
    recipes = chosen_recipes(args)
    first, tuned_at = {}, {}  # one sweep per distinct recipe: the ε it was tuned at first names it
    for tuned in sorted(recipes, key=lambda t: -1 if t is None else t):
        first.setdefault(same_recipe(recipes[tuned]), tuned)
        tuned_at.setdefault(first[same_recipe(recipes[tuned])], []).append(tuned)
    groups: dict[float | None, list[float]] = {}
    for epsilon in epsilons:
        groups.setdefault(first[same_recipe(recipes[recipe_for(epsilon, recipes)])], []).append(epsilon)
    with_baseline = first[same_recipe(recipes[recipe_for(ABLATION_EPSILON, recipes)])]
    rows, parts = [], []
    for tuned, eps in groups.items():
        name = "recipe" if tuned is None else f"tuned_eps{tuned:g}"
        out = args.out / "frontier" / name
        print(f"frontier: {name} ({describe(recipes[tuned])}) at ε {', '.join(f'{e:g}' for e in eps)}", flush=True)
        got = frontier_sweep(recipes[tuned], "tuned", eps, seeds, out, tuned == with_baseline, args)
        rows += got
        parts.append({"label": "tuned", "folder": str(out), "tuned_at": None if tuned is None else tuned_at[tuned],
                      "epsilons": eps, "recipe": describe(recipes[tuned]),
                      "same_recipe": same_recipe(machine(shrink(recipes[tuned], args), args))})
    seed = TrainConfig.from_dict(load_recipe(SEED_RECIPE), source=str(SEED_RECIPE)).with_overrides(
        {"run.test_every_epoch": False})
    print(f"frontier: the seed's defaults ({describe(seed)}, k = {seed.data.k})", flush=True)
    out = args.out / "frontier" / "seed_defaults"
    rows += frontier_sweep(seed, "seed defaults", epsilons, seeds, out, False, args)
    parts.append({"label": "seed defaults", "folder": str(out), "epsilons": epsilons, "recipe": describe(seed),
                  "same_recipe": same_recipe(machine(shrink(seed, args), args))})
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
    rows = [
        ("activation -> relu", activation not in (None, "relu"), f"model.activation: {activation} -> relu",
         {"model.activation": "relu"}, f"model.activation is {activation}"),
        ("ScatterNet -> plain CNN", m.name.startswith("scatternet"),
         f"model.name: {m.name} -> sample_convnet ({activation})",
         {"model.name": "sample_convnet", "model.activation": activation}, f"model.name is {m.name}"),
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
                    and r["target_epsilon"] == ABLATION_EPSILON and r["seed"] in seeds]
            if len(rows) == len(seeds):
                return rows
    return None


def phase_ablation(args) -> dict:
    recipes = chosen_recipes(args)
    full = recipes[recipe_for(ABLATION_EPSILON, recipes)]
    seeds = list(range(SMOKE["seeds"] if args.smoke else args.seeds))
    print(f"ablation at ε = {ABLATION_EPSILON:g}: {describe(full)}", flush=True)
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
            rows = frontier_sweep(full.with_overrides(overrides), variant, [ABLATION_EPSILON], seeds, folder,
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
              "epsilon": ABLATION_EPSILON, "seeds": seeds, "recipe": describe(full), "variants": results}
    write_json(args.out / "ablation.json", report)
    print_table(["variant", "change", "test acc (mean ± sd)", "Δ vs full"],
                [[r["variant"], r["change"], f"{r['mean']:.4f} ± {r['sd']:.4f}" if "mean" in r else "skipped",
                  f"{r['delta_vs_full']:+.4f}" if "mean" in r else ""] for r in results])
    return report


# --------------------------------------------------------------------------------------------- docs tables
def marked(text: str, name: str, body: str) -> str:
    """``text`` with the part between ``<!-- accuracy:NAME -->`` and ``<!-- /accuracy:NAME -->`` replaced."""
    start, end = f"<!-- accuracy:{name} -->", f"<!-- /accuracy:{name} -->"
    if start not in text or end not in text:
        raise ValueError(f"--docs: no {start} ... {end} markers to fill")
    head, rest = text.split(start, 1)
    return head + start + "\n" + body.rstrip("\n") + "\n" + end + rest.split(end, 1)[1]


def write_docs(args) -> None:
    """Fill the docs' marked tables from ``tune.json``, ``frontier.json`` and ``ablation.json`` under ``--out``."""
    from dpvision.runs import atomic_write_bytes, atomic_write_text

    found = {p: json.loads((args.out / f"{p}.json").read_text()) for p in PHASES if (args.out / f"{p}.json").is_file()}
    if not found:
        raise ValueError(f"--write-docs: no tune.json, frontier.json or ablation.json in {args.out}")
    if any(r["smoke"] for r in found.values()) and Path(args.docs).resolve() == DOCS.resolve():
        raise ValueError(f"--write-docs: {args.out} holds --smoke results; give --docs OTHER.md to see them")
    text = Path(args.docs).read_text(encoding="utf-8")
    commands = list(dict.fromkeys(r["command"] for r in found.values()))  # --phase all: one command, three files
    text = marked(text, "commands", "```\n" + "\n".join(commands) + "\n```\n"
                  + "Device: " + "; ".join(sorted({r["device"] for r in found.values()})) + ".")
    if "tune" in found:
        text = marked(text, "tune", tune_table(found["tune"]))
    if "frontier" in found:
        picture = Path(args.docs).with_name(Path(args.docs).stem + "_frontier.png")
        atomic_write_bytes(picture, (args.out / "frontier.png").read_bytes())
        text = marked(text, "frontier",
                      frontier_table(found["frontier"]) + f"\n![privacy-utility frontier]({picture.name})\n")
        text = marked(text, "targets", targets_table(found["frontier"]))
    if "ablation" in found:
        text = marked(text, "ablation", ablation_table(found["ablation"]))
    atomic_write_text(args.docs, text)
    print(f"wrote {args.docs}")


def tune_table(tune: dict) -> str:
    lines = [f"Search space: {tune['search_space_size']} combinations ({tune['grid_file']}); "
             f"{tune['selection']}.", "",
             "| target ε | configurations tried | best validation accuracy | chosen recipe |",
             "|---|---|---|---|"]
    lines += [f"| {e} | {tune['configs_tried'][e]} | {100 * b['val_accuracy']:.2f}% | `{b['recipe']}` |"
              for e, b in tune["best"].items()]
    return "\n".join(lines) + "\n"


def frontier_table(frontier: dict) -> str:
    lines = ["| recipe | target ε | test accuracy (mean ± sd) | seeds | ε RDP / PRV / PLD (max over seeds) | "
             "seconds per run (mean, max) |", "|---|---|---|---|---|---|"]
    for p in frontier["points"]:
        eps = "∞ (no DP)" if p["target_epsilon"] in ("inf", math.inf) else f"{float(p['target_epsilon']):g}"
        privacy = "—" if eps[0] == "∞" else " / ".join(f"{float(p[f'epsilon_{a}']):.3f}"
                                                        for a in ("rdp", "prv", "pld"))
        lines.append(f"| {p['recipe']} | {eps} | {100 * p['mean']:.2f}% ± {100 * p['sd']:.2f} | {p['n']} | {privacy} "
                     f"| {p['seconds_mean']:.1f}, {p['seconds_max']:.1f} |")
    def source(part: dict) -> str:
        if not part.get("tuned_at"):
            return ""
        tuned = " and ".join(f"{e:g}" for e in part["tuned_at"])
        return f" (best on validation at ε = {tuned}; used at ε = {', '.join(f'{e:g}' for e in part['epsilons'])})"

    lines += ["", "Recipes: " + "; ".join(f"{p['label']}{source(p)}: `{p['recipe']}`" for p in frontier["sweeps"])]
    return "\n".join(lines) + "\n"


def targets_table(frontier: dict) -> str:
    tuned = {float(p["target_epsilon"]): p for p in frontier["points"] if p["recipe"] == "tuned"}
    lines = ["| target | measured | met |", "|---|---|---|"]
    for epsilon, goal in TARGETS.items():
        p = tuned.get(epsilon)
        got = f"{100 * p['mean']:.2f}% (n = {p['n']})" if p else "not measured"
        met = "yes" if p and p["mean"] >= goal else "no"
        lines.append(f"| ≥ {100 * goal:.1f}% at ε = {epsilon:g} | {got} | {met} |")
    private = [p for p in frontier["points"] if p["recipe"] == "tuned" and p["target_epsilon"] not in ("inf", math.inf)]
    slowest = max((p["seconds_max"] for p in private), default=math.nan)
    lines.append(f"| ≤ {MAX_SECONDS_PER_POINT:.0f} s per ε point (one run) | {slowest:.1f} s (slowest run) | "
                 f"{'yes' if slowest <= MAX_SECONDS_PER_POINT else 'no'} |")
    return "\n".join(lines) + "\n"


def ablation_table(ablation: dict) -> str:
    n = len(ablation["seeds"])
    lines = [f"At ε = {ablation['epsilon']:g}, {n} seed{'s' if n > 1 else ''}; full recipe: `{ablation['recipe']}`.",
             "", "| variant | change | test accuracy (mean ± sd) | Δ vs full |", "|---|---|---|---|"]
    for r in ablation["variants"]:
        if "mean" in r:
            lines.append(f"| {r['variant']} | {r['change'] or '—'} | {100 * r['mean']:.2f}% ± {100 * r['sd']:.2f} | "
                         f"{100 * r['delta_vs_full']:+.2f} |")
        else:
            lines.append(f"| {r['variant']} | — | not run: {r['skipped']} | |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--phase", choices=(*PHASES, "all"), default=None, help="which phase to run")
    parser.add_argument("--write-docs", action="store_true", help="fill the tables of --docs from the JSON files")
    parser.add_argument("--smoke", action="store_true", help="tiny everything: a CPU check in minutes")
    parser.add_argument("--data-root", default="data", help="holds MNIST/raw/ (default: data)")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="run.device (default: auto)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: "
                        f"{DEFAULT_OUT.relative_to(REPO)}, with --smoke {SMOKE_OUT.relative_to(REPO)})")
    parser.add_argument("--grid", type=Path, default=GRID_FILE, help="tune phase: the candidate recipes (YAML)")
    parser.add_argument("--max-configs", type=int, default=None,
                        help="tune phase: candidates per ε (default: the grid's max_configs)")
    parser.add_argument("--recipe", type=Path, default=None, help="frontier/ablation: this recipe instead of tune.json")
    parser.add_argument("--seeds", type=int, default=SEEDS,
                        help=f"frontier/ablation: seeds per point (default {SEEDS}; tune: the grid's seeds)")
    parser.add_argument("--docs", type=Path, default=DOCS,
                        help="--write-docs: the page to fill (default docs/accuracy.md)")
    args = parser.parse_args(argv)
    if args.phase is None and not args.write_docs:
        parser.error("give --phase tune|frontier|ablation|all and/or --write-docs")
    args.out = args.out or (SMOKE_OUT if args.smoke else DEFAULT_OUT)
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
        started = time.perf_counter()
        if args.phase:
            args.out.mkdir(parents=True, exist_ok=True)
        for phase in (PHASES if args.phase == "all" else [args.phase] if args.phase else []):
            {"tune": phase_tune, "frontier": phase_frontier, "ablation": phase_ablation}[phase](args)
        if args.phase:
            print(f"done in {time.perf_counter() - started:.0f}s; results in {args.out}", flush=True)
        if args.write_docs:
            write_docs(args)

    return run_guarded(parser, work)


if __name__ == "__main__":
    sys.exit(main())

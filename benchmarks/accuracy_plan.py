"""What ``benchmarks/accuracy.py`` trains: the dataset profiles, the grid files, and a GPU-seconds budget.

* :data:`PROFILES`: per dataset (``--dataset``), its grid file, results folder, frontier ε, the recipe the
  frontier compares with (MNIST: the seed's defaults) and the issue's accuracy targets.
* :func:`load_grid` / :func:`candidates`: a grid file is ``base`` plus either ``axes`` (a product, of which
  ``max_configs`` points are drawn at random) or ``candidates`` (an explicit list, tried in the listed order:
  the published starting points first).
* :func:`estimate_seconds` / :func:`within_budget`: H100 seconds of one run, from the repository's own
  measurements, and the candidates that fit ``--budget-seconds`` (the rest are dropped, and counted).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from dpvision.jobs.config import SECTIONS, RecipeLoader, TrainConfig

REPO = Path(__file__).resolve().parents[1]
MAX_LIST, MAX_CONFIGS, MAX_GRID = 100, 10_000, 1_000_000  # bounds on a grid file: bounded work and memory


@dataclass(frozen=True)
class Profile:
    dataset: str  # data.dataset
    grid: Path
    out: str  # folder under benchmarks/results/
    frontier_epsilons: tuple[float, ...]
    seed_recipe: Path | None  # also swept on the frontier (MNIST: the seed's own defaults)
    baseline: bool  # the tuned recipe without DP on the frontier
    targets: dict[float, float]  # mean test accuracy per ε (docs' targets table)
    train_size: int  # the full training set (the cost model scales with the images trained on)
    docs_prefix: str  # docs/accuracy.md markers: <!-- accuracy:{prefix}tune --> ...


PROFILES = {
    "mnist": Profile("mnist", REPO / "benchmarks" / "accuracy_grid.yaml", "accuracy", (0.5, 1.0, 2.0, 3.0, 8.0),
                     REPO / "recipes" / "mnist_seed.yaml", True, {3.0: 0.985, 1.0: 0.975}, 60_000, ""),
    "fashion-mnist": Profile("fashion-mnist", REPO / "benchmarks" / "accuracy_grid_fashion-mnist.yaml",
                             "accuracy_fashion-mnist", (1.0, 3.0), None, False, {3.0: 0.90, 1.0: 0.88}, 60_000,
                             "fashion-mnist:"),
    "cifar10": Profile("cifar10", REPO / "benchmarks" / "accuracy_grid_cifar10.yaml", "accuracy_cifar10",
                       (1.0, 2.0, 4.0, 8.0), None, False, {8.0: 0.795, 1.0: 0.65}, 50_000, "cifar10:"),
}

# H100 seconds of one DP epoch over the full training set at augmult K <= 1, fast engine, large batches:
# sample_convnet 0.10 s (docs/performance.md: 0.094-0.097 s/epoch); scatternet_cnn 28x28 0.28 s (the MNIST
# frontier's 60-epoch runs: 17 s mean, docs/accuracy.md). The scatternet_linear and 32x32x3 ScatterNet
# entries are not measured: guesses from the feature sizes (81 channels at 7x7; 243 at 8x8), marked here.
# WRN-16-4 is in WRN_SECONDS_PER_VIEW instead: its cost per example-view depends on K and on weight
# standardisation.
SECONDS_PER_EPOCH = {
    ("sample_convnet", "mnist"): 0.10, ("scatternet_cnn", "mnist"): 0.28, ("scatternet_linear", "mnist"): 0.20,
    ("sample_convnet", "cifar10"): 0.15,
    ("scatternet_cnn", "cifar10"): 1.0, ("scatternet_linear", "cifar10"): 0.8,  # guesses (not measured)
}
# WRN-16-4 on 32x32 images, H100 seconds per example-view by (weight standardisation, K bucket: K < 4, 4 <= K < 16,
# K >= 16), from bench_augmult.py (bf16, E[B] 4096, fused; docs/performance.md, sessions 4, 8, 9 and 10): K = 16
# 27 us (no WS) and 33 us (WS); K = 4 40 us (no WS, session 10's chunks of 256 examples) and 128 us (WS, session 9,
# chunks of 1,024: not re-measured); K = 1 84 us (no WS, session 4, before the fusion). The cost per
# view falls as K grows, so each bucket takes its smallest K's cost (an over- not an under-estimate), and K = 1
# with WS, not measured, takes the largest (128 us).
WRN_SECONDS_PER_VIEW = {(False, 1): 84e-6, (False, 4): 40e-6, (False, 16): 27e-6,
                        (True, 1): 128e-6, (True, 4): 128e-6, (True, 16): 33e-6}
RUN_OVERHEAD_SECONDS = 4.0  # data onto the GPU, graph capture, σ calibration, the final evaluation
SHAPE_OF = {"mnist": "mnist", "fashion-mnist": "mnist", "cifar10": "cifar10"}  # same image shape, same cost


@dataclass(kw_only=True)
class Grid:
    epsilons: list[float]
    seeds: list[int]
    max_configs: int
    sample_seed: int
    base: dict  # a partial recipe
    axes: list[tuple[str, list[dict]]]  # (axis name, [{"section.field": value, ...} per choice])
    listed: list[dict] | None  # ``candidates:`` in the file (then no axes)
    size: int  # of the full product, or the number listed


def known_field(key: str) -> bool:
    section, _, name = key.partition(".")
    return section in SECTIONS and name in {f.name for f in fields(SECTIONS[section])}


def check(ok: bool, path: Path, key: str, valid: str, value) -> None:
    if not ok:
        raise ValueError(f"--grid {path}: {key} must be {valid}, got {value!r}")


def _axes(path: Path, spec: dict) -> list[tuple[str, list[dict]]]:
    axes = []
    for name, values in spec.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"--grid {path}: axis {name} must be a non-empty list")
        choices = [dict(v) if isinstance(v, dict) else {name: v} for v in values]
        unknown = sorted({key for choice in choices for key in choice if not known_field(key)})
        if unknown:
            print(f"note: grid axis {name} skipped: {', '.join(unknown)} is not a setting of this dpvision")
            continue
        axes.append((name, choices))
    return axes


def _listed(path: Path, spec, base: dict) -> list[dict]:
    check(isinstance(spec, list) and 1 <= len(spec) <= MAX_CONFIGS and all(isinstance(c, dict) for c in spec),
          path, "candidates", f"a list of 1 to {MAX_CONFIGS} mappings of section.field: value", spec)
    for i, point in enumerate(spec):
        unknown = sorted(key for key in point if not known_field(key))
        check(not unknown, path, f"candidates[{i}]", "section.field keys of dpvision's config", unknown)
        TrainConfig.from_dict(base).with_overrides(point)  # a bad value fails here, naming the field
    return [dict(point) for point in spec]


def load_grid(path: Path) -> Grid:
    """The grid file; axes naming a field this dpvision lacks are dropped with a printed note."""
    try:
        spec = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=RecipeLoader)  # noqa: S506 (safe)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"--grid {path}: cannot read ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict) or (isinstance(spec.get("axes"), dict)) == ("candidates" in spec) \
            or ("axes" in spec and not spec["axes"]):
        raise ValueError(f"--grid {path}: needs a mapping with epsilons, seeds, base and either axes (a mapping) "
                         "or candidates (a list)")
    base = spec.get("base") or {}
    TrainConfig.from_dict(base, source=f"--grid {path} base")  # fails early, names the field
    axes = _axes(path, spec["axes"]) if "axes" in spec else []
    listed = _listed(path, spec["candidates"], base) if "candidates" in spec else None
    grid = Grid(epsilons=spec.get("epsilons", [1, 3]), seeds=spec.get("seeds", [0]),
                max_configs=spec.get("max_configs", 24 if listed is None else len(listed)),
                sample_seed=spec.get("sample_seed", 0), base=base, axes=axes, listed=listed,
                size=len(listed) if listed is not None else math.prod(len(c) for _, c in axes))
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


def candidates(grid: Grid, max_configs: int, *, smoke: bool = False) -> list[dict]:
    """``max_configs`` points, each ``{field: value}``: the first listed, or a seeded sample of the product.

    ``smoke``: the first and the last point instead.
    """
    if grid.listed is not None:
        points = grid.listed
        return ([points[0], points[-1]] if len(points) > 1 else points) if smoke else points[:max_configs]
    product = list(itertools.product(*(choices for _, choices in grid.axes)))
    if smoke:
        product = [product[0], product[-1]] if len(product) > 1 else product
    elif len(product) > max_configs:
        keep = sorted(random.Random(grid.sample_seed).sample(range(len(product)), max_configs))
        product = [product[i] for i in keep]
    return [{k: v for choice in point for k, v in choice.items()} for point in product]


def estimate_seconds(config: TrainConfig, train_size: int) -> float:
    """H100 seconds of one run of ``config`` (DP or not), from :data:`SECONDS_PER_EPOCH`; nan if unknown."""
    views = max(1, config.optim.augmult)
    shape = SHAPE_OF.get(config.data.dataset, "")
    if (config.model.name, shape) == ("wrn16_4", "cifar10"):
        bucket = max(k for _, k in WRN_SECONDS_PER_VIEW if k <= views)  # the largest measured K not above
        per_epoch = WRN_SECONDS_PER_VIEW[bool(config.model.weight_standardization), bucket] * train_size
    else:
        per_epoch = SECONDS_PER_EPOCH.get((config.model.name, shape))
    if per_epoch is None:
        return math.nan
    images = min(config.data.k or train_size, train_size) - config.data.val_size
    return RUN_OVERHEAD_SECONDS + per_epoch * views * config.optim.epochs * images / train_size


def within_budget(tune_costs: list[float], final_costs: list[float], runs_each: int, reserve_runs: int,
                  budget: float | None) -> list[bool]:
    """Which candidates to keep, in order: candidate i costs ``tune_costs[i] * runs_each`` seconds to tune,
    and ``reserve_runs`` final runs of the costliest kept one must still fit (``budget`` None: keep all).

    Example:
        >>> within_budget([10, 50, 10], [12, 60, 12], runs_each=2, reserve_runs=3, budget=100)
        [True, False, True]
    """
    if budget is None:
        return [True] * len(tune_costs)
    keep, spent, costliest = [], 0.0, 0.0
    for cost, final in zip(tune_costs, final_costs):
        if not (math.isfinite(cost) and math.isfinite(final)):
            keep.append(False)  # an unknown cost never fits a budget
            continue
        worst = max(costliest, final)
        fits = spent + cost * runs_each + worst * reserve_runs <= budget
        keep.append(fits)
        if fits:
            spent, costliest = spent + cost * runs_each, worst
    return keep

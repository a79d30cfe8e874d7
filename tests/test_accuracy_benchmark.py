"""benchmarks/accuracy.py for every dataset (issue 24): grids, the budget, and the whole script on tiny data.

The end-to-end tests run ``--phase all --smoke`` on tiny files in each dataset's real on-disk format
(tests/data_fixtures.py) with a two-candidate grid of small CNNs, then check what the benchmark promises:
candidates judged on the validation split only (no test number anywhere in the tune runs), the test set
evaluated once per reported configuration, the number of configurations tried, a second invocation that
trains nothing new, and the docs tables filled from the JSON.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from tests.data_fixtures import write_cifar10, write_idx_mnist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark's modules import each other by name

import accuracy  # noqa: E402
import accuracy_plan  # noqa: E402
from accuracy_plan import PROFILES, candidates, estimate_seconds, load_grid, within_budget  # noqa: E402

from dpvision.jobs.config import TrainConfig  # noqa: E402


@pytest.mark.parametrize("dataset", sorted(PROFILES))
def test_each_dataset_grid_loads_with_published_candidates_first(dataset):
    profile = PROFILES[dataset]
    grid = load_grid(profile.grid)
    points = candidates(grid, grid.max_configs)
    configs = [TrainConfig.from_dict(grid.base).with_overrides(p) for p in points]
    assert all(c.data.dataset == dataset and c.data.val_size > 0 and c.dp.enabled for c in configs)
    costs = [estimate_seconds(c, profile.train_size) for c in configs]
    assert all(math.isfinite(c) and c > 0 for c in costs)
    if dataset == "mnist":  # unchanged: the seeded sample of 10 of the 96 combinations
        assert grid.size == 96 and len(points) == 10
    else:  # explicit lists, cheapest published starting point first
        assert grid.listed is not None and len(points) == grid.size
    if dataset == "cifar10":  # De et al.'s full recipe is listed and costs more than an hour
        assert max(costs) > 3600


def test_estimate_scales_with_epochs_views_and_images():
    base = TrainConfig.from_dict({"data": {"dataset": "fashion-mnist"}, "model": {"name": "scatternet_cnn"},
                                  "optim": {"epochs": 10}})
    one = estimate_seconds(base, 60_000) - accuracy_plan.RUN_OVERHEAD_SECONDS
    assert one == pytest.approx(2.8)
    doubled = base.with_overrides({"optim.epochs": 20, "optim.augmult": 2, "data.val_size": 30_000})
    assert estimate_seconds(doubled, 60_000) - accuracy_plan.RUN_OVERHEAD_SECONDS == pytest.approx(2 * one)
    unknown = base.with_overrides({"model.name": "celeba_cnn"})
    assert math.isnan(estimate_seconds(unknown, 60_000))


def test_wrn_cost_per_view_follows_k_and_weight_standardisation():
    """Sessions 9 and 10's H100 rows: a view costs more at K = 4 than at 16, more with weight standardisation; K between
    measured points is costed at the smaller measured K (never an underestimate)."""
    base = TrainConfig.from_dict({"data": {"dataset": "cifar10"}, "model": {"name": "wrn16_4"}, "optim": {"epochs": 1}})

    def per_view(k: int, ws: bool) -> float:
        config = base.with_overrides({"optim.augmult": k, "model.weight_standardization": ws})
        return (estimate_seconds(config, 50_000) - accuracy_plan.RUN_OVERHEAD_SECONDS) / (50_000 * max(1, k))

    assert per_view(4, True) == pytest.approx(128e-6) and per_view(16, True) == pytest.approx(33e-6)
    assert per_view(4, False) == pytest.approx(40e-6) and per_view(16, False) == pytest.approx(27e-6)
    assert per_view(8, True) == pytest.approx(per_view(4, True)) and per_view(32, True) == pytest.approx(33e-6)
    assert per_view(2, False) == pytest.approx(84e-6) and per_view(0, False) == pytest.approx(84e-6)


def test_budget_keeps_candidates_in_order_and_reserves_the_final_runs():
    assert within_budget([10, 50, 10], [12, 60, 12], 2, 0, None) == [True, True, True]
    assert within_budget([10, 50, 10], [12, 60, 12], 2, 0, 100) == [True, False, True]
    # the final runs of the costliest kept candidate must fit as well: 2 x 10 + 3 x 12 = 56 <= 60, not 2 x 10 more
    assert within_budget([10, 10], [12, 12], 2, 3, 60) == [True, False]
    assert within_budget([math.nan, 5], [math.nan, 5], 1, 0, 100) == [False, True]


def tiny_grid(path: Path, dataset: str) -> Path:
    spec = {"epsilons": [1, 3], "seeds": [0],
            "base": {"data": {"dataset": dataset, "val_size": 5000},
                     "model": {"name": "sample_convnet", "activation": "tanh"},
                     "optim": {"name": "sgd", "momentum": 0.9, "eval_batch_size": 512},
                     "dp": {"enabled": True, "delta": 1e-5, "max_grad_norm": 0.1},
                     "run": {"engine": "fast", "select": "last", "test_every_epoch": False}},
            "candidates": [{"optim.batch_size": 512, "optim.lr": 2.0, "optim.epochs": 2},
                           {"optim.batch_size": 1024, "optim.lr": 4.0, "optim.epochs": 2,
                            "optim.ema_decay": 0.9}]}
    path.write_text(yaml.safe_dump(spec))
    return path


def write_data(root: Path, dataset: str) -> None:
    if dataset == "cifar10":
        write_cifar10(root, 600, 100)
    else:
        write_idx_mnist(root, 600, 100, folder={"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[dataset])


def docs_page(path: Path, prefix: str) -> Path:
    names = ("commands", "tune", "frontier", "targets", "ablation")
    path.write_text("".join(f"<!-- accuracy:{prefix}{n} -->\n<!-- /accuracy:{prefix}{n} -->\n" for n in names))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_smoke_end_to_end(tmp_path, dataset, capsys):
    write_data(tmp_path / "data", dataset)
    out, grid = tmp_path / "out", tiny_grid(tmp_path / "grid.yaml", dataset)
    argv = ["--dataset", dataset, "--phase", "all", "--smoke", "--data-root", str(tmp_path / "data"),
            "--device", "cpu", "--out", str(out), "--grid", str(grid), "--seeds", "1"]
    assert accuracy.main(argv) == 0
    tune = json.loads((out / "tune.json").read_text())
    assert tune["configs_tried"] == {"1": 2, "3": 2} and tune["search_space_size"] == 2
    for run in tune["runs"]:  # judged on validation; no test number survives in a tune run
        summary = json.loads((out / "tune" / "runs" / run["name"] / "summary.json").read_text())
        assert summary["num_val"] == accuracy.SMOKE["val_size"] and summary["test_accuracy"] is None
    frontier = json.loads((out / "frontier.json").read_text())
    assert {r["value"] for r in frontier["rows"]} == {"tuned"}  # no seed recipe, no baseline for this dataset
    assert sorted(float(p["target_epsilon"]) for p in frontier["points"]) == [1.0, 3.0]
    assert all(p["n"] == 1 and 0 <= p["mean"] <= 1 for p in frontier["points"])
    finished = sorted(p.stat().st_mtime_ns for p in out.rglob("summary.json"))
    capsys.readouterr()
    assert accuracy.main(argv) == 0  # a second sitting trains nothing new
    assert sorted(p.stat().st_mtime_ns for p in out.rglob("summary.json")) == finished
    assert "(done earlier)" in capsys.readouterr().out
    prefix = PROFILES[dataset].docs_prefix
    page = docs_page(tmp_path / "page.md", prefix)
    assert accuracy.main(["--dataset", dataset, "--write-docs", "--out", str(out), "--docs", str(page)]) == 0
    text = page.read_text()
    assert "| 1 | 2 |" in text and "| 3 | 2 |" in text  # configurations tried per target ε
    assert f"page_{prefix.replace(':', '_')}frontier.png" in text


def test_budget_too_small_for_any_candidate_is_a_clear_error(tmp_path, capsys):
    write_data(tmp_path / "data", "fashion-mnist")
    argv = ["--dataset", "fashion-mnist", "--phase", "tune", "--budget-seconds", "5", "--data-root",
            str(tmp_path / "data"), "--device", "cpu", "--out", str(tmp_path / "out")]
    assert accuracy.main(argv) == 2
    err = capsys.readouterr().err
    assert "--budget-seconds 5: no candidate" in err and not (tmp_path / "out" / "tune.json").exists()


def test_a_sitting_limit_in_a_grid_is_refused_before_anything_trains(tmp_path, capsys):
    write_data(tmp_path / "data", "fashion-mnist")
    grid = yaml.safe_load(PROFILES["fashion-mnist"].grid.read_text())
    grid["base"].setdefault("run", {})["max_minutes"] = 5
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    argv = ["--dataset", "fashion-mnist", "--phase", "tune", "--grid", str(tmp_path / "grid.yaml"), "--data-root",
            str(tmp_path / "data"), "--device", "cpu", "--out", str(tmp_path / "out")]
    assert accuracy.main(argv) == 2
    assert "run.max_minutes 5 would pause a run" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tune.json").exists() and not (tmp_path / "out" / "runs").exists()


def test_grid_of_another_dataset_is_refused(tmp_path, capsys):
    argv = ["--dataset", "cifar10", "--phase", "tune", "--grid", str(PROFILES["mnist"].grid), "--out",
            str(tmp_path / "out")]
    assert accuracy.main(argv) == 2 and "base data.dataset is mnist, not --dataset cifar10" in capsys.readouterr().err


def test_mnist_defaults_are_unchanged():
    _, args = accuracy.parse_args(["--phase", "all"])
    assert args.grid == REPO / "benchmarks" / "accuracy_grid.yaml"
    assert args.out == REPO / "benchmarks" / "results" / "accuracy"
    assert args.seed_recipe == REPO / "recipes" / "mnist_seed.yaml" and args.baseline
    assert args.ablation_epsilon == 3.0


def test_budget_drops_the_candidates_that_do_not_fit_and_reserves_the_frontier(capsys):
    grid = load_grid(PROFILES["fashion-mnist"].grid)
    points = candidates(grid, grid.max_configs)
    _, args = accuracy.parse_args(["--dataset", "fashion-mnist", "--phase", "tune", "--budget-seconds", "200"])
    args.epsilons = [1.0, 3.0]
    kept, costs = accuracy.budgeted(grid, points, 1, args)
    assert kept == [0, 1, 2, 3, 5]  # c04 (~35 s) and c06 (augmult 4, ~66 s) do not fit after the others
    assert sum(costs[i] for i in kept) * 2 <= 200 < sum(costs[i] for i in [*kept, 4]) * 2
    assert "c06" in capsys.readouterr().out
    _, args = accuracy.parse_args(["--dataset", "fashion-mnist", "--phase", "all", "--budget-seconds", "200"])
    args.epsilons = [1.0, 3.0]
    reserved, _ = accuracy.budgeted(grid, points, 1, args)  # 2 ε x 3 seeds of final runs must fit too
    assert len(reserved) < len(kept) and reserved == kept[:len(reserved)]


def test_ablation_variants_of_a_cached_linear_recipe_are_valid_configs():
    """The shipped Fashion-MNIST recipe (ScatterNet + linear, run.cache_features: true) ablates to configurations that
    validate: the plain CNN gets the CNN's default activation and the cache back to auto (it has no frozen features),
    the others keep the cache; a technique the recipe lacks has no overrides."""
    recipe = REPO / "benchmarks" / "results" / "accuracy_probes_2026-12-06_s5" / "fmnist_eps3.yaml"
    config = TrainConfig.from_dict(yaml.safe_load(recipe.read_text())).with_overrides({"run.cache_features": True})
    rows = {variant: (change, overrides) for variant, change, overrides in accuracy.ablations(config)}
    change, plain = rows["ScatterNet -> plain CNN"]
    assert plain == {"model.name": "sample_convnet", "model.activation": "relu", "run.cache_features": "auto"}
    assert change == "model.name: scatternet_linear -> sample_convnet (relu)"
    assert config.with_overrides(plain).run.cache_features == "auto"
    assert config.with_overrides(rows["EMA off"][1]).run.cache_features is True
    assert rows["activation -> relu"][1] is None and rows["augmult off"][1] is None

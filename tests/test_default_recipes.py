"""The default recipe of each dataset (src/dpvision/recipes/default_<dataset>.yaml, issue 24 item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dpvision.jobs.config import TrainConfig, load_recipe

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = sorted((REPO / "src" / "dpvision" / "recipes").glob("default_*.yaml"))
MEASURED = REPO / "benchmarks" / "results" / "default_recipes"


def split(path: Path) -> tuple[TrainConfig, TrainConfig]:
    """(the DP recipe, the --disable-dp baseline: DP off, then the recipe's ``baseline`` overrides)."""
    values = load_recipe(path)
    baseline = values.pop("baseline")
    config = TrainConfig.from_dict(values, source=str(path))
    return config, config.deactivated().with_overrides(baseline)


def test_defaults_exist_for_the_datasets_without_a_seed():
    assert [p.name for p in DEFAULTS] == ["default_cifar10.yaml", "default_fashion-mnist.yaml"]


@pytest.mark.parametrize("path", DEFAULTS, ids=[p.name for p in DEFAULTS])
def test_default_is_private_calibrated_and_its_baseline_is_plain_sgd(path):
    config, baseline = split(path)
    assert config.data.dataset == path.stem.removeprefix("default_")
    assert config.dp.enabled and config.dp.target_epsilon and config.dp.delta == 1e-5
    assert config.optim.batch_size >= 2048  # DP-SGD wants large batches ...
    assert not baseline.dp.enabled and baseline.optim.batch_size <= 256  # ... plain SGD small ones
    assert baseline.optim.lr <= 0.1 and baseline.optim.augmult == 0 and baseline.model == config.model


def test_fashion_mnist_baseline_is_the_configuration_measured_above_80_percent():
    """benchmarks/results/default_recipes holds the CPU run of issue 24's command (k 10,000, 2 epochs)."""
    _, baseline = split(REPO / "src" / "dpvision" / "recipes" / "default_fashion-mnist.yaml")
    measured = yaml.safe_load((MEASURED / "fashion-mnist_disable-dp_k10000_e2_cpu_config.yaml").read_text())
    measured.pop("resolved")
    ran = TrainConfig.from_dict(measured)
    # what the command line set (data folder, k, epochs, device, run folder); C is not used without DP
    expected = baseline.with_overrides({"data.root": ran.data.root, "data.k": 10000, "optim.epochs": 2,
                                        "run.device": "cpu", "run.runs_dir": ran.run.runs_dir,
                                        "dp.max_grad_norm": ran.dp.max_grad_norm})
    assert ran == expected
    summary = yaml.safe_load((MEASURED / "fashion-mnist_disable-dp_k10000_e2_cpu_summary.json").read_text())
    assert summary["dp"] is False and summary["num_train"] == 10000 and summary["test_accuracy"] > 0.80

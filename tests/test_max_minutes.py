"""``run.max_minutes`` (``--max-minutes``): a sitting stops cleanly after an epoch's checkpoint, and ``--resume``
continues it to exactly the result of one uninterrupted run; the limit belongs to one invocation.

Tiny synthetic MNIST, q = 0.5: 2 steps an epoch, 3 epochs, DP. A limit of a millionth of a minute ends every
sitting after its first epoch (the last epoch of a run always finishes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dpvision.cli import main as dpvision_main
from dpvision.jobs.config import TrainConfig
from dpvision.jobs.train import run
from tests.job_helpers import assert_same_run, exit_code, metrics

TINY = 1e-6  # minutes: every sitting ends after one epoch


def argv(root: Path, runs: Path, name: str, *extra) -> list[str]:
    return ["train", "--dataset", "mnist", "--data-root", str(root), "--k", "40", "--batch-size", "20", "--epochs",
            "3", "--sigma", "1.0", "--quiet", "--runs-dir", str(runs), "--run-name", name, *map(str, extra)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_mnist_root) -> Path:
    runs = tmp_path_factory.mktemp("reference")
    assert dpvision_main(argv(tiny_mnist_root, runs, "r")) == 0
    return runs / "mnist" / "r"


def test_sittings_resume_to_the_result_of_one_uninterrupted_run(tmp_path, tiny_mnist_root, reference, capsys):
    folder = tmp_path / "mnist" / "r"
    assert dpvision_main(argv(tiny_mnist_root, tmp_path, "r", "--max-minutes", TINY)) == 0
    out = capsys.readouterr().out
    assert "Paused after epoch 1 of 3" in out and f"--resume {folder}" in out
    assert len(metrics(folder)) == 1 and not (folder / "summary.json").exists()
    assert metrics(folder) == metrics(reference)[:1]  # what was written is the uninterrupted run's epoch 1
    assert yaml.safe_load((folder / "config.yaml").read_text())["run"]["max_minutes"] is None  # a --config of the run

    assert dpvision_main(["train", "--resume", str(folder), "--max-minutes", str(TINY)]) == 0  # a second sitting
    assert "Paused after epoch 2 of 3" in capsys.readouterr().out and len(metrics(folder)) == 2
    assert dpvision_main(["train", "--resume", str(folder), "--max-minutes", str(TINY)]) == 0  # the last epoch
    assert "Paused" not in capsys.readouterr().out
    assert_same_run(folder, reference)


def test_a_resume_does_not_inherit_the_limit_of_the_first_sitting(tmp_path, tiny_mnist_root, reference):
    config = TrainConfig.from_dict({
        "data": {"dataset": "mnist", "root": str(tiny_mnist_root), "k": 40},
        "optim": {"epochs": 3, "batch_size": 20}, "dp": {"noise_multiplier": 1.0, "target_epsilon": None},
        "run": {"quiet": True, "runs_dir": str(tmp_path), "run_name": "r", "max_minutes": TINY}})
    paused = run(config, announce=False)
    assert paused["status"] == "paused" and (paused["epoch"], paused["epochs"], paused["steps"]) == (1, 3, 2)
    assert paused["epsilon"] == float(metrics(Path(paused["run_dir"]))[0]["epsilon"]) > 0
    summary = run(resume=paused["run_dir"], overrides={"run.quiet": True}, announce=False)  # no limit given
    assert "status" not in summary and summary["epochs_completed"] == 3
    assert_same_run(Path(paused["run_dir"]), reference)


def test_a_generous_limit_changes_nothing(tmp_path, tiny_mnist_root, reference):
    assert dpvision_main(argv(tiny_mnist_root, tmp_path, "r", "--max-minutes", 60)) == 0
    assert_same_run(tmp_path / "mnist" / "r", reference)


@pytest.mark.parametrize("value", [0, -1, "soon", True, float("inf"), float("nan")])
def test_bad_limits_are_refused_naming_the_field(value):
    with pytest.raises(ValueError, match=r"^run\.max_minutes must be a number of minutes > 0"):
        TrainConfig.from_dict({"run": {"max_minutes": value}})


def test_the_flag_gets_a_one_line_error_and_a_sweep_refuses_the_limit(tmp_path, tiny_mnist_root, capsys):
    assert exit_code(dpvision_main, argv(tiny_mnist_root, tmp_path, "r", "--max-minutes", 0)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run.max_minutes must be a number of minutes > 0" in err
    sweep = ["sweep", *argv(tiny_mnist_root, tmp_path, "s")[1:], "--epsilons", "1", "--out", tmp_path / "sweep",
             "--max-minutes", 1]
    sweep = [a for a in sweep if a != "--sigma" and a != "1.0"]
    assert exit_code(dpvision_main, sweep) == 2
    assert "a sweep runs many" in capsys.readouterr().err and not (tmp_path / "sweep").exists()
    varied = [*sweep[:-2], "--vary", "run.max_minutes=0.000001,60"]  # the limit through --vary: refused the same
    assert exit_code(dpvision_main, varied) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a sweep runs many" in err and not (tmp_path / "sweep").exists()

"""Checkpoint and resume through ``python mnist.py``: an interrupted run, resumed, ends exactly where the
uninterrupted one does (seed CSV bytes, weights, ε), and a resume refuses anything that would change the result.

The interruption is a test hook (``dpvision.jobs.train.run(hook=...)``) raising at a chosen step, injected
under the front-end by :func:`hooked`; the resume is the real command, ``mnist.py --resume RUN``.
Tiny synthetic MNIST, q = 0.5: 2 steps an epoch, 3 epochs.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch

from dpvision.checkpoint import CHECKPOINT_NAME, CheckpointError
from dpvision.cli import main as dpvision_main
from dpvision.jobs.mnist_seed import main as mnist_main
from dpvision.jobs.train import run
from tests.job_helpers import Interrupt, assert_same_weights, exit_code, interrupt_at, metrics, summary

CSV_NAME = "mnist_0.15_1.3_1.0_20_3_0.3_40.csv"


def tiny_args(tmp: Path, data_root: Path, *extra) -> list:
    return ["--data-root", data_root, "--k", "40", "--batch-size", "20", "--epochs", "3", "--test-batch-size",
            "2000", "--quiet", "--out-dir", tmp / "out", "--runs-dir", tmp / "runs", "--run-name", "r", *extra]


@contextlib.contextmanager
def hooked(hook):
    """Every training run started inside (by any front-end) gets ``hook``."""
    import dpvision.jobs.train as train_module

    original = train_module.run

    def run_with_hook(*args, **kwargs):
        return original(*args, **{**kwargs, "hook": hook})

    train_module.run = run_with_hook
    try:
        yield
    finally:
        train_module.run = original


def interrupted(tmp: Path, data_root: Path, hook, *extra) -> Path:
    """Start ``mnist.py`` and let ``hook`` stop it; return the run folder."""
    with hooked(hook), pytest.raises(Interrupt):
        mnist_main([str(a) for a in tiny_args(tmp, data_root, *extra)])
    return tmp / "runs" / "mnist" / "r"


@pytest.fixture(scope="module")
def references(tmp_path_factory, tiny_mnist_root):
    """The uninterrupted run of each engine (made when first asked for)."""
    made: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in made:
            tmp = tmp_path_factory.mktemp(f"reference_{engine}")
            assert mnist_main([str(a) for a in tiny_args(tmp, tiny_mnist_root, "--engine", engine)]) == 0
            made[engine] = tmp
        return made[engine]
    return get


def resume(run_path: Path, *extra) -> dict:
    assert mnist_main(["--resume", str(run_path), *map(str, extra)]) == 0
    return summary(run_path)


def assert_same_result(tmp: Path, result: dict, reference_tmp: Path) -> None:
    assert (tmp / "out" / CSV_NAME).read_bytes() == (reference_tmp / "out" / CSV_NAME).read_bytes()
    run_path, reference_run = tmp / "runs" / "mnist" / "r", reference_tmp / "runs" / "mnist" / "r"
    assert (run_path / CSV_NAME).read_bytes() == (reference_tmp / "out" / CSV_NAME).read_bytes()
    assert metrics(run_path) == metrics(reference_run)
    assert_same_weights(run_path, reference_run)
    reference = summary(reference_run)
    assert result["epsilon"] == reference["epsilon"] and result["steps"] == reference["steps"] == 6
    assert result["epsilons"] == reference["epsilons"] and result["resumed"] is True
    assert result["test_accuracy"] == reference["test_accuracy"]


@pytest.mark.parametrize("engine", [pytest.param("opacus", marks=pytest.mark.slow), "fast"])
def test_interrupt_after_epoch_then_resume_is_identical(tmp_path, tiny_mnist_root, references, engine):
    run_path = interrupted(tmp_path, tiny_mnist_root, interrupt_at("epoch", 1), "--engine", engine)
    assert (run_path / CHECKPOINT_NAME).exists() and not (run_path / "summary.json").exists()
    assert_same_result(tmp_path, resume(run_path), references(engine))


def test_interrupt_mid_epoch_then_resume_is_identical(tmp_path, tiny_mnist_root, references):
    run_path = interrupted(tmp_path, tiny_mnist_root, interrupt_at("step", 1, epoch_of_step=2))
    # Only epoch 1 is on disk: the step of epoch 2 was never released and is replayed.
    assert len((tmp_path / "out" / CSV_NAME).read_text().splitlines()) == 2
    state = torch.load(run_path / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 1 and state["ledger"]["history"] == [[1.3, 0.5, 2]]
    assert_same_result(tmp_path, resume(run_path), references("fast"))
    header = (run_path / "metrics.csv").read_text().splitlines()[0]
    assert [row["epoch"] for row in metrics(run_path)] == ["1", "2", "3"]
    assert "epsilon_prv" in header and "epsilon_pld" in header


def test_interrupt_before_first_checkpoint_and_resume_finished_run(tmp_path, tiny_mnist_root, references):
    run_path = interrupted(tmp_path, tiny_mnist_root, interrupt_at("step", 1, epoch_of_step=1))
    assert not (run_path / CHECKPOINT_NAME).exists()
    assert_same_result(tmp_path, resume(run_path), references("fast"))
    again = resume(run_path)  # a finished run resumes to the same end without training
    assert_same_result(tmp_path, again, references("fast"))


def test_resume_through_the_job_api_and_dpvision_train(tmp_path, tiny_mnist_root, references):
    """A run folder of mnist.py resumes with ``dpvision train --resume`` too (one job, one folder format)."""
    run_path = interrupted(tmp_path, tiny_mnist_root, interrupt_at("epoch", 2))
    assert exit_code(dpvision_main, ["train", "--resume", run_path, "--quiet"]) == 0
    reference_run = references("fast") / "runs" / "mnist" / "r"
    assert metrics(run_path) == metrics(reference_run)
    assert_same_weights(run_path, reference_run)


def test_checkpoint_loads_weights_only_with_plain_config(references):
    state = torch.load(references("fast") / "runs" / "mnist" / "r" / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 3 and state["steps"] == 6 and len(state["fingerprint"]) == 64
    generators = [name for name in state["engine"] if name.endswith("_generator")]
    assert "noise_generator" in generators and len(generators) >= 2  # noise and sampling, each saved
    for name in generators:
        assert state["engine"][name].dtype == torch.uint8
    assert state["config"]["optim.lr"] == 0.15 and state["config"]["run.engine"] == "fast"
    assert state["config"]["resolved.noise_multiplier"] == 1.3
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in state["config"].values())
    assert [row["epoch"] for row in state["extra"]["metrics"]] == [1, 2, 3]


def test_foreign_checkpoint_is_refused(tmp_path, tiny_mnist_root, references, capsys):
    run_path = interrupted(tmp_path, tiny_mnist_root, interrupt_at("epoch", 1), "--lr", "0.1")
    shutil.copyfile(references("fast") / "runs" / "mnist" / "r" / CHECKPOINT_NAME, run_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="different configuration"):
        run(resume=run_path)
    assert exit_code(mnist_main, ["--resume", run_path, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different configuration" in err


def test_edited_config_is_refused_on_the_command_line(tmp_path, tiny_mnist_root, capsys):
    run_path = interrupted(tmp_path, tiny_mnist_root, interrupt_at("epoch", 1))
    config = (run_path / "config.yaml").read_text()
    assert config.count("lr: 0.15") == 1
    (run_path / "config.yaml").write_text(config.replace("lr: 0.15", "lr: 0.2"))
    rows_before = (run_path / "metrics.csv").read_bytes()
    assert exit_code(mnist_main, ["--resume", run_path, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different configuration" in err
    assert (run_path / "metrics.csv").read_bytes() == rows_before


@pytest.mark.parametrize("flags", [["--lr", "0.1"], ["--epochs", "3"], ["--accountant", "prv"], ["--seed=1"],
                                   ["--max-eps", "2"], ["--disable-dp"], ["--k", "10"], ["--engine", "opacus"]])
def test_result_changing_flags_are_refused_with_resume(flags, tmp_path, capsys):
    assert exit_code(mnist_main, ["--resume", tmp_path, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be given with --resume" in err and flags[0].split("=")[0][:7] in err


@pytest.mark.parametrize("flags", [["--lr", "0.1"], ["--config", "x.yaml"], ["--set", "optim.lr=1"],
                                   ["--disable-dp"], ["--engine", "opacus"], ["--epochs", "9"]])
def test_dpvision_train_refuses_result_changing_flags_with_resume(flags, tmp_path, capsys):
    assert exit_code(dpvision_main, ["train", "--resume", tmp_path, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be given with --resume" in err and flags[0] in err


def test_free_flags_are_accepted_with_resume(tmp_path, tiny_mnist_root, references):
    args = [a for a in tiny_args(tmp_path, tiny_mnist_root) if a != "--quiet"]
    with hooked(interrupt_at("epoch", 2)), pytest.raises(Interrupt):
        mnist_main([str(a) for a in args])
    run_path = tmp_path / "runs" / "mnist" / "r"
    assert mnist_main(["--resume", str(run_path), "--quiet", "--device", "cpu", "--data-root",
                       str(tiny_mnist_root)]) == 0
    assert (tmp_path / "out" / CSV_NAME).read_bytes() == (references("fast") / "out" / CSV_NAME).read_bytes()


def test_resume_needs_a_run_folder(tmp_path, capsys):
    assert exit_code(mnist_main, ["--resume", tmp_path / "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run folder" in err
    assert exit_code(dpvision_main, ["train", "--resume", tmp_path]) == 2  # a folder, but no config.yaml
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run folder" in err

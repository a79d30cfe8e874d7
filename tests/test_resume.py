"""Checkpoint and resume: an interrupted run, resumed, ends exactly where the uninterrupted one does."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dpvision.checkpoint import CHECKPOINT_NAME, CheckpointError
from dpvision.cli import mnist_main
from dpvision.mnist import MnistConfig, load_resume_config, run

CSV_NAME = "mnist_0.15_1.3_1.0_30_3_0.3_300.csv"


class Interrupt(Exception):
    pass


def tiny(tmp: Path, mnist_root: Path, **kw) -> MnistConfig:
    # q = 0.1: 10 steps an epoch, 3 epochs, SampleConvNet on 300 real MNIST images; the stock
    # engine unless a test asks for another (the reference run below is the stock engine's).
    kw.setdefault("engine", "opacus")
    return MnistConfig(k=300, batch_size=30, epochs=3, test_batch_size=2000, quiet=True, data_root=str(mnist_root),
                       out_dir=str(tmp / "out"), runs_dir=str(tmp / "runs"), run_name="r", **kw)


def interrupt_at(event: str, value: int, epoch_of_step: int | None = None):
    """A hook raising at ``(event, value)``; for steps, only in epoch ``epoch_of_step``."""
    epochs_done = [0]

    def hook(name: str, n: int) -> None:
        if name == "epoch":
            epochs_done[0] = n
        if name == event and n == value and (epoch_of_step is None or epochs_done[0] + 1 == epoch_of_step):
            raise Interrupt(f"{name} {n}")
    return hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_root):
    tmp = tmp_path_factory.mktemp("reference")
    summary = run(tiny(tmp, mnist_root))
    return tmp, summary


def resume(run_path: Path) -> dict:
    config, _ = load_resume_config(run_path)
    return run(config, resume=run_path)


def assert_same_result(tmp: Path, summary: dict, reference) -> None:
    ref_tmp, ref_summary = reference
    assert (tmp / "out" / CSV_NAME).read_bytes() == (ref_tmp / "out" / CSV_NAME).read_bytes()
    weights = torch.load(tmp / "runs" / "mnist" / "r" / "model.pt", weights_only=True)
    ref_weights = torch.load(ref_tmp / "runs" / "mnist" / "r" / "model.pt", weights_only=True)
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    assert summary["epsilon"] == ref_summary["epsilon"] and summary["steps"] == ref_summary["steps"] == 30
    assert summary["epsilons"] == ref_summary["epsilons"] and summary["resumed"] is True


@pytest.mark.parametrize("engine", ["opacus", "fast"])
def test_interrupt_after_epoch_then_resume_is_identical(tmp_path, mnist_root, reference, engine):
    if engine == "fast":  # the reference run is Opacus's: compare fast with fast
        ref_tmp = tmp_path / "ref"
        reference = (ref_tmp, run(tiny(ref_tmp, mnist_root, engine="fast")))
    with pytest.raises(Interrupt):
        run(tiny(tmp_path, mnist_root, engine=engine), hook=interrupt_at("epoch", 1))
    run_path = tmp_path / "runs" / "mnist" / "r"
    assert (run_path / CHECKPOINT_NAME).exists() and not (run_path / "summary.json").exists()
    assert_same_result(tmp_path, resume(run_path), reference)


def test_interrupt_mid_epoch_then_resume_is_identical(tmp_path, mnist_root, reference):
    with pytest.raises(Interrupt):
        run(tiny(tmp_path, mnist_root), hook=interrupt_at("step", 6, epoch_of_step=2))
    run_path = tmp_path / "runs" / "mnist" / "r"
    # Only epoch 1 is on disk: the 6 steps of epoch 2 were never released and are replayed.
    assert len((tmp_path / "out" / CSV_NAME).read_text().splitlines()) == 2
    state = torch.load(run_path / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 1 and state["ledger"]["history"] == [[1.3, 0.1, 10]]
    summary = resume(run_path)
    assert_same_result(tmp_path, summary, reference)
    metrics = (run_path / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == ["1", "2", "3"]
    assert "epsilon_prv" in metrics[0] and "epsilon_pld" in metrics[0]


def test_interrupt_before_first_checkpoint_and_resume_finished_run(tmp_path, mnist_root, reference):
    with pytest.raises(Interrupt):
        run(tiny(tmp_path, mnist_root), hook=interrupt_at("step", 3, epoch_of_step=1))
    run_path = tmp_path / "runs" / "mnist" / "r"
    assert not (run_path / CHECKPOINT_NAME).exists()
    assert_same_result(tmp_path, resume(run_path), reference)
    again = resume(run_path)  # a finished run resumes to the same end without training
    assert_same_result(tmp_path, again, reference)


def test_checkpoint_loads_weights_only_with_plain_config(reference):
    ref_tmp, _ = reference
    state = torch.load(ref_tmp / "runs" / "mnist" / "r" / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 3 and state["steps"] == 30 and len(state["fingerprint"]) == 64
    for name in ("order_generator", "noise_generator"):
        assert state["engine"][name].dtype == torch.uint8
    assert state["config"]["lr"] == 0.15 and state["config"]["engine"] == "opacus"
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in state["config"].values())
    assert [row["Epoch"] for row in state["extra"]["rows"]] == [1, 2, 3]


def test_foreign_checkpoint_is_refused(tmp_path, mnist_root, reference):
    with pytest.raises(Interrupt):
        run(tiny(tmp_path, mnist_root, lr=0.1), hook=interrupt_at("epoch", 1))
    run_path = tmp_path / "runs" / "mnist" / "r"
    ref_tmp, _ = reference
    shutil.copyfile(ref_tmp / "runs" / "mnist" / "r" / CHECKPOINT_NAME, run_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match="different configuration"):
        resume(run_path)


def test_edited_config_is_refused_on_the_command_line(tmp_path, mnist_root, capsys):
    with pytest.raises(Interrupt):
        run(tiny(tmp_path, mnist_root), hook=interrupt_at("epoch", 1))
    run_path = tmp_path / "runs" / "mnist" / "r"
    config = (run_path / "config.yaml").read_text()
    (run_path / "config.yaml").write_text(config.replace("lr: 0.15", "lr: 0.2"))
    with pytest.raises(SystemExit) as exit_info:
        mnist_main(["--resume", str(run_path), "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different configuration" in err


@pytest.mark.parametrize("flags", [["--lr", "0.1"], ["--epochs", "3"], ["--accountant", "prv"], ["--seed=1"],
                                   ["--max-eps", "2"], ["--disable-dp"]])
def test_result_changing_flags_are_refused_with_resume(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist_main(["--resume", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be given with --resume" in err


def test_free_flags_are_accepted_with_resume(tmp_path, mnist_root, reference):
    with pytest.raises(Interrupt):
        run(replace(tiny(tmp_path, mnist_root), quiet=False), hook=interrupt_at("epoch", 2))
    run_path = tmp_path / "runs" / "mnist" / "r"
    assert mnist_main(["--resume", str(run_path), "--quiet", "--device", "cpu", "--data-root", str(mnist_root)]) == 0
    ref_tmp, _ = reference
    assert (tmp_path / "out" / CSV_NAME).read_bytes() == (ref_tmp / "out" / CSV_NAME).read_bytes()


def test_resume_needs_a_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mnist_main(["--resume", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "run folder" in capsys.readouterr().err

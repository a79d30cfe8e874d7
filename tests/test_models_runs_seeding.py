"""Run folders and seeding: the small shared pieces (model tests: tests/test_models.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from dpvision.cli import main
from dpvision.jobs.errors import one_line
from dpvision.runs import RunDir, atomic_write_text
from dpvision.seeding import derive_seed, make_generator
from tests.job_helpers import exit_code, metrics


def test_streams_are_independent_and_reproducible():
    assert derive_seed(0, "sampling") != derive_seed(0, "noise") != derive_seed(1, "sampling")
    a = torch.rand(5, generator=make_generator(7, "noise"))
    assert torch.equal(a, torch.rand(5, generator=make_generator(7, "noise")))
    assert not torch.equal(a, torch.rand(5, generator=make_generator(7, "sampling")))


def test_run_dir_never_overwrites_and_metrics_append(tmp_path):
    first = RunDir.create(tmp_path, "mnist", "run", ["epoch", "loss"])
    second = RunDir.create(tmp_path, "mnist", "run", ["epoch", "loss"])
    assert first.path.name == "run" and second.path.name == "run-2"
    first.append_metrics({"epoch": 1, "loss": 0.5})
    first.append_metrics({"epoch": 2, "loss": 0.25})
    assert (first.path / "metrics.csv").read_text() == "epoch,loss\n1,0.5\n2,0.25\n"
    with pytest.raises(ValueError, match="unknown columns"):
        first.append_metrics({"epoch": 3, "typo": 1})
    first.write_summary({"epsilon": float("inf")})
    assert '"epsilon": "inf"' in (first.path / "summary.json").read_text()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# ---------------------------------------------------------------- issue 20 item 10: a full disk

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file name


@pytest.mark.parametrize("where", ["os.fsync", "os.replace"])
def test_a_failed_atomic_write_names_the_file_and_keeps_the_old_content(tmp_path, monkeypatch, where):
    target = tmp_path / "checkpoint.pt"
    atomic_write_text(target, "old")
    monkeypatch.setattr(where, _no_space)
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert one_line(info.value) == f"{target}: No space left on device"
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_new_run_folder_is_removed_when_a_write_fails_before_its_first_epoch(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path, "mnist", "run", ["epoch"])
    run.lock()
    run.write_config({"lr": 0.1})
    with pytest.raises(OSError, match="removed the new run folder .*no epoch was completed"):
        with run.removed_on_write_failure():
            _no_space()
    assert not run.path.exists() and [p.name for p in (tmp_path / "mnist").iterdir()] == []
    monkeypatch.setattr("os.fsync", _no_space)
    with pytest.raises(OSError) as info:  # config.yaml itself cannot be written: no folder is left either
        RunDir.create(tmp_path, "mnist", "other").write_config({"lr": 0.1})
    assert info.value.filename == str(tmp_path / "mnist" / "other" / "config.yaml")
    assert list((tmp_path / "mnist").iterdir()) == []


def test_a_run_folder_with_an_epoch_or_not_made_here_is_kept(tmp_path):
    done = RunDir.create(tmp_path, "mnist", "done", ["epoch"])
    done.write_config({"lr": 0.1})
    done.append_metrics({"epoch": 1})
    resumed = RunDir(done.path, ["epoch"])  # what --resume opens
    for run in (done, resumed):
        with pytest.raises(OSError) as info, run.removed_on_write_failure():
            _no_space()
        assert "removed" not in str(info.value)
        assert sorted(p.name for p in done.path.iterdir()) == ["config.yaml", "metrics.csv"]


def test_full_disk_in_the_first_epoch_of_dpvision_train(tmp_path, monkeypatch, capsys, tiny_mnist_root):
    """The error names checkpoint.pt and the new run folder is gone; a later epoch keeps the folder."""
    real_replace = os.replace
    failing = {"epoch": 1}

    def replace(src, dst):
        if Path(dst).name == "checkpoint.pt" and torch.load(src, weights_only=True)["epoch"] == failing["epoch"]:
            _no_space()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    argv = ["train", "--dataset", "mnist", "--data-root", tiny_mnist_root, "--k", "40", "--batch-size", "20",
            "--epochs", "2", "--device", "cpu", "--quiet", "--runs-dir", tmp_path]
    assert exit_code(main, [*argv, "--run-name", "first"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'mnist' / 'first' / 'checkpoint.pt'}: No space left on device" in err
    assert not (tmp_path / "mnist").exists() or list((tmp_path / "mnist").iterdir()) == []
    failing["epoch"] = 2
    assert exit_code(main, [*argv, "--run-name", "second"]) == 2
    kept = tmp_path / "mnist" / "second"
    assert {"config.yaml", "metrics.csv", "checkpoint.pt"} <= {p.name for p in kept.iterdir()}
    assert [row["epoch"] for row in metrics(kept)] == ["1"] and not list(kept.glob(".*.tmp"))


def test_text_holding_a_name_that_is_not_utf8_is_one_oserror_naming_the_file(tmp_path):
    """Issue 20 item 8: such a name (handed over as a lone surrogate) gave a bare 'utf-8' codec error."""
    target = tmp_path / "subset_index.csv"
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "image_id,source\n1.jpg,/data/caf\udcff/1.jpg\n")
    assert info.value.errno == errno.EILSEQ and info.value.filename == str(target)
    assert one_line(info.value).startswith(f"{target}: cannot write it as UTF-8 text") and "caf\\udcff" in one_line(
        info.value)
    assert list(tmp_path.iterdir()) == []

"""Run folders and seeding: the small shared pieces (model tests: tests/test_models.py)."""

from __future__ import annotations

import pytest
import torch

from dpvision.runs import RunDir, atomic_write_text
from dpvision.seeding import derive_seed, make_generator


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

"""``celeba_train.py`` (the CelebA front-end of the one training job): baseline and DP runs on a folder made
by the real pipeline (demo archive -> build_subset -> preprocess at 32x32), every file and number checked.

The archive is the shared 400-image demo (``tests/celeba_fixtures.py``), balanced and stratified by
interocular distance: ~128 train, ~16 validation and ~16 test images, a few seconds per run on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import re
import subprocess
import sys

import pytest
import torch

from dpvision.celeba.preprocessing import load_split, preprocess
from dpvision.celeba.subset import build_subset
from dpvision.engines import evaluate
from dpvision.jobs.celeba_seed import add_train_arguments, config_from_args
from dpvision.jobs.celeba_seed import main as train_main
from dpvision.jobs.report import group_accuracy
from dpvision.jobs.rundir import restore
from dpvision.jobs.setup import plan_privacy
from dpvision.jobs.train import BEST_MODEL
from dpvision.models import build_model
from dpvision.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from tests.celeba_fixtures import SCRIPTS, demo_archive  # noqa: F401 (fixture)
from tests.job_helpers import Interrupt, exit_code, interrupt_at, rdp_epsilon

RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", BEST_MODEL, "model.pt", "curves.png", "checkpoint.pt")
SUMMARY_KEYS = ("test_accuracy", "epsilon", "epsilons", "delta", "noise_multiplier", "sample_rate", "steps",
                "test_accuracy_per_class", "test_accuracy_per_stratum", "best_epoch", "mode")
TINY = ["--epochs", "2", "--batch-size", "32", "--width", "8", "--quiet"]
DP_FLAGS = ["--mode", "dp", "--sigma", "1.1", "--max-grad-norm", "1.5", "--lr", "0.2", "--delta", "1e-4"]


@pytest.fixture(scope="module")
def pre_dir(demo_archive, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("celeba_train")
    build_subset(demo_archive, root / "subset", use_landmarks=True, stratify_by=["interocular"], iod_bins=2,
                 link_mode="symlink", progress=False, warn=lambda msg: None)
    preprocess(root / "subset", root / "pre", size=32, progress=False)
    return root / "pre"


def run_ok(*args) -> None:
    assert train_main([str(a) for a in args]) == 0


@pytest.fixture(scope="module")
def runs(pre_dir, tmp_path_factory):
    """One baseline and one DP run, shared by the checks below, and what the DP run printed."""
    runs_dir = tmp_path_factory.mktemp("runs")
    run_ok("--data", pre_dir, "--mode", "baseline", "--runs-dir", runs_dir, "--run-name", "base", "--lr", "0.05",
           *TINY)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_ok("--data", pre_dir, *DP_FLAGS, "--runs-dir", runs_dir, "--run-name", "dp", *TINY)
    return {"baseline": runs_dir / "celeba_baseline" / "base", "dp": runs_dir / "celeba_dp" / "dp",
            "runs_dir": runs_dir, "printed": printed.getvalue()}


def summary_of(path):
    return json.loads((path / "summary.json").read_text())


def metrics_of(path):
    with open(path / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def parse(argv):
    """The job's config for ``celeba_train.py <argv>``."""
    from dpvision.cli_support import given_flags

    parser = add_train_arguments(argparse.ArgumentParser())
    argv = [str(a) for a in argv]
    return config_from_args(parser.parse_args(argv), given_flags(parser, argv))


@pytest.mark.parametrize("mode", ["baseline", "dp"])
def test_run_folder_has_every_file_and_field(runs, mode):
    path = runs[mode]
    for name in RUN_FILES:
        assert (path / name).is_file(), f"{mode}: {name} missing"
    summary = summary_of(path)
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["mode"] == mode and summary["epochs_completed"] == 2 and summary["dataset"] == "celeba"
    rows = metrics_of(path)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"):
            assert math.isfinite(float(row[key])), (key, row[key])
        for key in ("epsilon_rdp", "epsilon_prv", "epsilon_pld"):
            assert key in row
        assert 0 <= float(row["val_accuracy"]) <= 1 and float(row["seconds"]) > 0
        assert row["test_accuracy"] == "nan"  # the trainer judges the test set once, at the end
    # config.yaml is now the job's recipe (sections) plus "resolved"; the mode is DP on or off, and the
    # run folder's group says it (the old flat config had "mode" and "job" keys)
    import yaml

    config = yaml.safe_load((path / "config.yaml").read_text())
    assert config["dp"]["enabled"] is (mode == "dp") and config["data"]["dataset"] == "celeba"
    assert config["model"] == {"name": "celeba_cnn", "activation": None, "width": 8, "weight_standardization": False,
                               "init": None, "init_head": "keep", "finetune": "all", "input_norm": "group"}
    assert config["run"]["select"] == "best_val" and path.parent.name == f"celeba_{mode}"
    assert (path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_spends_no_privacy_and_dp_does(runs):
    base, dp = summary_of(runs["baseline"]), summary_of(runs["dp"])
    assert base["epsilon"] == "inf" and base["noise_multiplier"] == 0.0 and base["dp"] is False
    assert all(r["epsilon"] == "inf" for r in metrics_of(runs["baseline"]))
    assert dp["dp"] is True and 0 < dp["epsilon"] < math.inf
    assert dp["noise_multiplier"] == 1.1 and dp["delta"] == 1e-4 and dp["max_grad_norm"] == 1.5


def test_epsilon_is_the_rdp_epsilon_of_the_steps_run(runs, pre_dir):
    summary, rows = summary_of(runs["dp"]), metrics_of(runs["dp"])
    n_train = len(load_split(pre_dir, "train")[0])
    q = 1 / math.ceil(n_train / 32)
    per_epoch = int(1 / q)
    assert summary["sample_rate"] == q and summary["steps"] == 2 * per_epoch and summary["num_train"] == n_train
    for epoch, row in enumerate(rows, start=1):
        assert int(row["steps"]) == epoch * per_epoch
        assert float(row["epsilon"]) == pytest.approx(rdp_epsilon(1.1, q, epoch * per_epoch, 1e-4), rel=1e-12)
    assert summary["epsilon"] == pytest.approx(rdp_epsilon(1.1, q, 2 * per_epoch, 1e-4), rel=1e-12)
    assert summary["epsilons"]["prv"] <= summary["epsilons"]["rdp"] + 1e-9
    assert float(rows[-1]["epsilon_pld"]) == pytest.approx(summary["epsilons"]["pld"], rel=1e-12)


def test_closing_summary_lines(runs):
    """Issue 14 item 3: outputs, accuracy (of the selected weights), ε under every accountant, wall time."""
    summary = summary_of(runs["dp"])
    eps = summary["epsilons"]
    lines = runs["printed"].strip().splitlines()
    assert len(lines) == 2, runs["printed"]
    assert re.fullmatch(rf"Done in \d+\.\ds: test accuracy {summary['test_accuracy']:.4f} \(best validation "
                        rf"epoch {summary['best_epoch']}\) \| ε = {eps['rdp']:.4f} \(rdp; prv {eps['prv']:.4f}, "
                        rf"pld {eps['pld']:.4f}\) at δ = 0\.0001 after {summary['steps']} steps", lines[0]), lines[0]
    assert lines[1] == (f"Outputs: {runs['dp']}/ (config.yaml, metrics.csv, summary.json, model.pt, "
                        f"{BEST_MODEL}, curves.png, checkpoint.pt)")


@pytest.mark.parametrize("mode", ["baseline", "dp"])
def test_per_class_and_per_stratum_accuracy_add_up(runs, pre_dir, mode):
    summary = summary_of(runs[mode])
    test_data, meta = load_split(pre_dir, "test")
    n = len(test_data)
    for acc_key, count_key, expected_groups in (
            ("test_accuracy_per_class", "test_count_per_class", set(meta["class_names"])),
            ("test_accuracy_per_stratum", "test_count_per_stratum", set(meta["strata"]))):
        accs, counts = summary[acc_key], summary[count_key]
        assert set(accs) == set(counts) == expected_groups
        assert sum(counts.values()) == n
        weighted = sum(accs[g] * counts[g] for g in accs) / n
        assert weighted == pytest.approx(summary["test_accuracy"], abs=1e-12)
    assert summary["test_accuracy_per_group"] == summary["test_accuracy_per_stratum"]


@pytest.mark.parametrize("mode", ["baseline", "dp"])
def test_best_on_validation_model_is_saved_and_scored(runs, pre_dir, mode):
    path = runs[mode]
    rows, summary = metrics_of(path), summary_of(path)
    val = [float(r["val_accuracy"]) for r in rows]
    assert summary["best_epoch"] == 1 + val.index(max(val))  # first epoch reaching the maximum
    model = build_model("celeba_cnn", in_channels=3, num_classes=2, image_size=32, width=8)
    model.load_state_dict(torch.load(path / BEST_MODEL, weights_only=True))
    test_data, _ = load_split(pre_dir, "test")
    _, accuracy, _ = evaluate(model, test_data, batch_size=512)
    assert accuracy == summary["test_accuracy"]
    val_data, _ = load_split(pre_dir, "val")
    assert evaluate(model, val_data, batch_size=512)[1] == pytest.approx(max(val))


def test_model_is_accepted_by_opacus_module_validator():
    from opacus.validators import ModuleValidator

    model = build_model("celeba_cnn", in_channels=3, num_classes=2, image_size=64, width=16)
    assert ModuleValidator.validate(model, strict=False) == []
    bad = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    assert ModuleValidator.validate(bad, strict=False) != []  # the check can fail


def test_group_accuracy():
    groups = group_accuracy(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 1]), ["x", "x", "y", "y"])
    assert groups == {"x": {"accuracy": 1.0, "count": 2}, "y": {"accuracy": 0.0, "count": 2}}


@pytest.mark.slow
def test_target_epsilon_calibrates_sigma(pre_dir, tmp_path):
    run_ok("--data", pre_dir, "--mode", "dp", "--target-epsilon", "4", "--delta", "1e-4", "--runs-dir", tmp_path,
           "--run-name", "t", "--epochs", "1", "--batch-size", "32", "--width", "8", "--quiet")
    summary = summary_of(tmp_path / "celeba_dp" / "t")
    q, steps = summary["sample_rate"], summary["steps"]
    assert summary["noise_multiplier"] == calibrate_noise_multiplier(
        target_epsilon=4.0, delta=1e-4, sample_rate=q, steps=steps, accountant="rdp")
    assert 4.0 * (1 - 1e-3) <= summary["epsilon"] <= 4.0
    assert summary["epsilon"] == compute_epsilon([(summary["noise_multiplier"], q, steps)], delta=1e-4)
    assert summary["target_epsilon"] == 4.0


@pytest.mark.slow
def test_max_epsilon_stops_before_the_budget(pre_dir, tmp_path):
    run_ok("--data", pre_dir, "--mode", "dp", "--sigma", "1.0", "--max-epsilon", "2.0", "--delta", "1e-4",
           "--runs-dir", tmp_path, "--run-name", "b", "--epochs", "50", "--batch-size", "32", "--width", "8",
           "--quiet")
    summary = summary_of(tmp_path / "celeba_dp" / "b")
    assert summary["stopped_early"] and summary["epochs_completed"] < 50
    assert summary["epsilon"] <= 2.0
    q = summary["sample_rate"]
    assert compute_epsilon([(1.0, q, summary["steps"] + 1)], delta=1e-4) > 2.0


def test_delta_auto_is_one_over_ten_n(pre_dir):
    n = len(load_split(pre_dir, "train")[0])
    for extra, delta in (([], 1 / (10 * n)), (["--delta", "2e-5"], 2e-5)):
        config = parse(["--data", pre_dir, "--batch-size", "32", *extra])
        assert plan_privacy(config, num_train=n).delta == delta


def test_default_learning_rate_depends_on_mode(pre_dir):
    assert parse(["--data", pre_dir, "--mode", "baseline"]).optim.lr == 0.05
    assert parse(["--data", pre_dir, "--mode", "dp"]).optim.lr == 0.1
    assert parse(["--data", pre_dir, "--mode", "baseline", "--lr", "0.3"]).optim.lr == 0.3
    baseline = parse(["--data", pre_dir, "--mode", "baseline"])
    assert not baseline.dp.enabled and baseline == parse(["--data", pre_dir, "--lr", "0.05"]).deactivated()


@pytest.mark.slow
def test_resume_continues_to_the_same_result(runs, pre_dir, tmp_path):
    import dpvision.jobs.train as train_module

    original = train_module.run
    train_module.run = lambda *a, **kw: original(*a, **{**kw, "hook": interrupt_at("epoch", 1)})
    try:
        with pytest.raises(Interrupt):
            train_main([str(a) for a in ("--data", pre_dir, *DP_FLAGS, "--runs-dir", tmp_path, "--run-name", "r",
                                         *TINY)])
    finally:
        train_module.run = original
    path = tmp_path / "celeba_dp" / "r"
    assert len(metrics_of(path)) == 1 and not (path / "summary.json").exists()
    assert train_main(["--resume", str(path), "--quiet"]) == 0
    resumed, reference = summary_of(path), summary_of(runs["dp"])
    assert resumed["resumed"] is True and resumed["mode"] == "dp"
    for key in ("test_accuracy", "epsilon", "steps", "test_accuracy_per_stratum", "best_epoch"):
        assert resumed[key] == reference[key], key
    assert [r["val_loss"] for r in metrics_of(path)] == [r["val_loss"] for r in metrics_of(runs["dp"])]
    assert torch.load(path / BEST_MODEL, weights_only=True).keys() == torch.load(
        runs["dp"] / BEST_MODEL, weights_only=True).keys()
    assert all(torch.equal(a, b) for a, b in zip(torch.load(path / BEST_MODEL, weights_only=True).values(),
                                                  torch.load(runs["dp"] / BEST_MODEL, weights_only=True).values()))
    with pytest.raises(ValueError, match="--lr"):
        from dpvision.jobs.loop import check_resume_flags
        check_resume_flags(["--resume", "--lr"], ["--resume", "--data", "--device", "--quiet"])
    assert restore(path, {})[0].dp.noise_multiplier == 1.1


BAD_INPUTS = [
    (["--mode", "dp"], "--data"),  # no --data at all
    (["--data", "{missing}", "--mode", "dp"], "--data"),
    (["--data", "{empty}", "--mode", "dp"], "--data"),  # a folder, but not a preprocessed one
    (["--data", "{pre}", "--mode", "private"], "--mode"),
    (["--data", "{pre}", "--mode", "dp", "--sigma", "-1"], "--sigma"),
    (["--data", "{pre}", "--mode", "dp", "--sigma", "1", "--target-epsilon", "2"], "--target-epsilon"),
    (["--data", "{pre}", "--mode", "baseline", "--sigma", "1"], "--sigma"),
    (["--data", "{pre}", "--mode", "baseline", "--sigma", "2"], "--sigma"),
    (["--data", "{pre}", "--mode", "baseline", "--target-epsilon", "3"], "--target-epsilon"),
    (["--data", "{pre}", "--mode", "baseline", "--max-epsilon", "1"], "--max-epsilon"),
    (["--data", "{pre}", "--mode", "baseline", "--max-grad-norm", "1"], "--max-grad-norm"),
    (["--data", "{pre}", "--mode", "dp", "--target-epsilon", "-3"], "--target-epsilon"),
    (["--data", "{pre}", "--mode", "dp", "--target-epsilon", "1e-9"], "--target-epsilon"),  # unreachable
    (["--data", "{pre}", "--mode", "dp", "--max-grad-norm", "0"], "--max-grad-norm"),
    (["--data", "{pre}", "--mode", "dp", "--delta", "1.5"], "--delta"),
    (["--data", "{pre}", "--mode", "dp", "--delta", "often"], "--delta"),
    (["--data", "{pre}", "--mode", "dp", "--epochs", "0"], "--epochs"),
    (["--data", "{pre}", "--mode", "dp", "--batch-size", "0"], "--batch-size"),
    (["--data", "{pre}", "--mode", "dp", "--batch-size", "100000"], "--batch-size"),
    (["--data", "{pre}", "--mode", "dp", "--lr", "-0.1"], "--lr"),
    (["--data", "{pre}", "--mode", "dp", "--optimizer", "rmsprop"], "--optimizer"),
    (["--data", "{pre}", "--mode", "dp", "--device", "tpu"], "--device"),
    (["--data", "{pre}", "--mode", "dp", "--engine", "jax"], "--engine"),
    (["--data", "{pre}", "--mode", "dp", "--accountant", "moments"], "--accountant"),
    (["--data", "{pre}", "--mode", "dp", "--max-epsilon", "0"], "--max-epsilon"),
    (["--data", "{pre}", "--mode", "dp", "--width", "12"], "--width"),
    (["--data", "{pre}", "--mode", "dp", "--epochs", "two"], "--epochs"),
    (["--resume", "{missing}"], "--resume"),
    (["--resume", "{empty}"], "--resume"),
]


@pytest.mark.parametrize("argv,flag", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_flag_and_writes_nothing(pre_dir, tmp_path, capsys, argv, flag):
    raw = list(argv)
    (tmp_path / "empty").mkdir()
    runs_dir = tmp_path / "runs"
    names = {"pre": pre_dir, "missing": tmp_path / "nope", "empty": tmp_path / "empty"}
    argv = [a.format(**names) for a in argv] + ["--runs-dir", str(runs_dir), "--quiet"]
    if "{pre}" in raw and "--batch-size" not in raw:
        argv += ["--batch-size", "32"]  # the default 256 is more than the tiny train split
    assert exit_code(train_main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and flag in err, err
    assert not runs_dir.exists()
    assert list((tmp_path / "empty").iterdir()) == []


def test_resume_refuses_result_changing_flags(runs, capsys):
    assert exit_code(train_main, ["--resume", str(runs["dp"]), "--lr", "0.3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lr" in err and len(err.splitlines()) == 1


def test_script_exits_2_before_writing(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPTS / "celeba_train.py"), "--data", str(tmp_path / "nope"),
                             "--mode", "dp", "--runs-dir", str(tmp_path / "runs")],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert "--data" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_subcommand_parses_and_runs_the_same_code(pre_dir, tmp_path, capsys):
    from dpvision.cli import main

    argv = ["train", "--data", str(pre_dir), "--mode", "dp", "--sigma", "-2", "--runs-dir", str(tmp_path / "runs")]
    assert exit_code(main, ["celeba", *argv]) == 2
    assert "dpvision celeba train: error: --sigma" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_job_writes_the_strata_itself(pre_dir, tmp_path, monkeypatch):
    """summary.json is written once, by the job, with the CelebA names (Hooks.summary_extra): what the job
    returns and what it wrote already hold ``mode`` and the per-stratum groups (no rewrite afterwards)."""
    import dpvision.jobs.train as train_module

    written = []
    original = train_module.run

    def run_and_read(*args, **kwargs):
        result = original(*args, **kwargs)
        written.append((result, summary_of(tmp_path / "celeba_baseline" / "r")))
        return result

    monkeypatch.setattr(train_module, "run", run_and_read)
    run_ok("--data", pre_dir, "--mode", "baseline", "--runs-dir", tmp_path, "--run-name", "r", *TINY)
    (returned, on_disk), = written
    for summary in (returned, on_disk):
        assert summary["mode"] == "baseline"
        assert summary["test_accuracy_per_stratum"] == summary["test_accuracy_per_group"]
        assert summary["test_count_per_stratum"] == summary["test_count_per_group"]
    assert on_disk == summary_of(tmp_path / "celeba_baseline" / "r")

"""``dpvision sweep``: one recipe over ε values and seeds, resumable, with results.csv, frontier.png, report.md.

Every sweep here trains SampleConvNet on the tiny synthetic MNIST (k = 200, expected batch 50: 4 steps an
epoch) with the real engine and accountant. One uninterrupted sweep (2 ε x 2 seeds + 2 baselines) is shared
by the module; the interrupted-and-restarted sweep is compared with it number for number.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

import dpvision.jobs.sweep as sweep_module
import dpvision.jobs.train as train_module
from dpvision.cli import main
from dpvision.jobs.sweep import plan_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPSILONS = (1.0, 3.0)
SEEDS = 2
RUNS = len(EPSILONS) * SEEDS + SEEDS  # + one baseline per seed
# Columns that depend on the clock or the folder, not on what was trained.
VOLATILE = ("wall_seconds", "run_dir")


def sweep_argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--dataset", "mnist", "--data-root", str(root), "--k", "200", "--batch-size", "50",
            "--epochs", "2", "--epsilons", ",".join(f"{e:g}" for e in EPSILONS), "--seeds", str(SEEDS),
            "--out", str(out), *extra]


def read_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


@pytest.fixture(scope="module")
def full_sweep(tmp_path_factory, tiny_mnist_root) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "out"
    assert main(sweep_argv(tiny_mnist_root, out)) == 0
    return out


def test_results_csv_rows_are_the_runs_summaries(full_sweep):
    rows = read_rows(full_sweep)
    assert [r["name"] for r in rows] == [p["name"] for p in plan_runs(
        epsilons=EPSILONS, seeds=range(SEEDS), vary=None, baseline=True)]
    for row in rows:
        summary = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        assert Path(row["run_dir"]) == full_sweep / "runs" / row["name"]
        assert float(row["test_accuracy"]) == summary["test_accuracy"]
        assert float(row["noise_multiplier"]) == summary["noise_multiplier"]
        assert int(row["steps"]) == summary["steps"] == 8
        assert int(row["seed"]) == summary["seed"]
        for name in ("rdp", "prv", "pld"):
            assert float(row[f"epsilon_{name}"]) == float(summary["epsilons"][name])
        assert float(row["epsilon"]) == float(summary["epsilon"])


def test_every_private_run_is_calibrated_to_its_target(full_sweep):
    rows = read_rows(full_sweep)
    private = [r for r in rows if not r["name"].startswith("baseline")]
    assert len(private) == len(EPSILONS) * SEEDS
    for row in private:
        target, epsilon = float(row["target_epsilon"]), float(row["epsilon_rdp"])
        assert 0.95 * target <= epsilon <= target, row["name"]  # calibrated: at, never above, the target
        assert float(row["epsilon_prv"]) <= target and float(row["epsilon_pld"]) <= target
        assert float(row["noise_multiplier"]) > 0
    sigmas = {float(r["target_epsilon"]): float(r["noise_multiplier"]) for r in private}
    assert sigmas[1.0] > sigmas[3.0]  # a smaller ε needs more noise
    for row in rows:
        if row["name"].startswith("baseline"):
            assert math.isinf(float(row["epsilon"])) and float(row["noise_multiplier"]) == 0.0


def test_frontier_png_and_report(full_sweep):
    png = (full_sweep / "frontier.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    from PIL import Image

    with Image.open(full_sweep / "frontier.png") as image:
        image.verify()
    report = (full_sweep / "report.md").read_text()
    assert f"{RUNS} of {RUNS} planned runs finished" in report
    assert "| as given | 1 |" in report and "| as given | 3 |" in report and "∞ (no DP)" in report
    assert f"--out {full_sweep}" in report  # the command that made it


def interrupt_third_run(monkeypatch):
    """Make the third training run stop with Ctrl-C right after its first epoch (checkpointed)."""
    real_run = train_module.run  # the sweep imports it from the module at each run
    calls = [0]

    def run(*args, **kwargs):
        calls[0] += 1
        if calls[0] != 3:
            return real_run(*args, **kwargs)

        def hook(event: str, n: int) -> None:
            if event == "epoch" and n == 1:
                raise KeyboardInterrupt

        return real_run(*args, hook=hook, **kwargs)

    monkeypatch.setattr(train_module, "run", run)
    return real_run


@pytest.mark.slow
def test_interrupted_sweep_restarts_where_it_stopped(tmp_path, tiny_mnist_root, full_sweep, monkeypatch, capsys):
    # The DP runs only (--no-baseline): the same 4 runs as the first 4 of the full sweep.
    out = tmp_path / "out"
    real_run = interrupt_third_run(monkeypatch)
    assert main(sweep_argv(tiny_mnist_root, out, "--no-baseline")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(read_rows(out)) == 2  # the two finished runs are already in results.csv
    third = out / "runs" / "eps3_seed0"
    assert (third / "checkpoint.pt").exists() and not (third / "summary.json").exists()
    finished = {p: (out / "runs" / p / "summary.json").stat().st_mtime_ns for p in ("eps1_seed0", "eps1_seed1")}

    monkeypatch.setattr(train_module, "run", real_run)
    assert main(sweep_argv(tiny_mnist_root, out, "--no-baseline")) == 0
    assert capsys.readouterr().out.count("(done earlier)") == 2
    assert {p: (out / "runs" / p / "summary.json").stat().st_mtime_ns for p in finished} == finished  # not rerun
    assert json.loads((third / "summary.json").read_text())["resumed"] is True  # continued from its checkpoint
    assert stable(read_rows(out)) == stable(read_rows(full_sweep))[:4]  # as if never interrupted
    assert "4 of 4 planned runs finished" in (out / "report.md").read_text()


@pytest.mark.parametrize("flag,value", [
    ("--epsilons", "a,b"), ("--epsilons", "0"), ("--epsilons", "1,3,1"), ("--epsilons", "-1"),
    ("--epsilons", "nan"), ("--epsilons", ","), ("--seeds", "0"), ("--vary", "nodot"), ("--vary", "optim.lr"),
    ("--vary", "optim.lr=0.1,0.10"), ("--vary", "optim.nosuchfield=1,2"), ("--vary", "run.seed=1,2"),
    ("--vary", "dp.target_epsilon=1,2"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tmp_path, tiny_mnist_root, capsys, flag, value):
    argv = sweep_argv(tiny_mnist_root, tmp_path / "out")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dpvision sweep: error: ") and flag in err, err
    assert not (tmp_path / "out").exists()


def test_another_recipe_in_the_same_out_is_refused(tmp_path, tiny_mnist_root, full_sweep, capsys):
    before = {p: p.read_bytes() for p in full_sweep.iterdir() if p.is_file()}
    for extra in (["--lr", "0.3"], ["--no-baseline"]):
        assert main(sweep_argv(tiny_mnist_root, full_sweep, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "holds another sweep" in err
    assert {p: p.read_bytes() for p in full_sweep.iterdir() if p.is_file()} == before


def test_vary_names_the_runs_and_a_restart_skips_finished_ones(tmp_path, tiny_mnist_root, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = sweep_argv(tiny_mnist_root, out, "--vary", "optim.lr=0.1,0.2", "--no-baseline")
    argv[argv.index("--epsilons") + 1], argv[argv.index("--seeds") + 1] = "2", "1"
    argv[argv.index("--epochs") + 1] = "1"
    real_point, calls = sweep_module._run_point, []

    def ctrl_c_at_second_run(config, folder, given):
        calls.append(folder.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_point(config, folder, given)

    monkeypatch.setattr(sweep_module, "_run_point", ctrl_c_at_second_run)
    assert main(argv) == 130
    names = ["eps2_seed0_optim.lr=0.1", "eps2_seed0_optim.lr=0.2"]
    assert [r["name"] for r in read_rows(out)] == names[:1] and "1 of 2 planned" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0
    assert calls == names + names[1:]  # the finished run was not started again
    assert "(done earlier)" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "runs").iterdir()) == names
    rows = read_rows(out)
    assert [r["name"] for r in rows] == names
    assert [(r["vary"], float(r["value"])) for r in rows] == [("optim.lr", 0.1), ("optim.lr", 0.2)]
    import yaml

    for name, lr in zip(names, (0.1, 0.2)):
        config = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        assert config["optim"]["lr"] == lr and config["run"]["seed"] == 0
        assert config["dp"]["target_epsilon"] == 2.0
    report = (out / "report.md").read_text()
    assert "| optim.lr | target ε |" in report and "2 of 2 planned runs finished" in report


def test_plan_names_with_a_varied_field():
    plan = plan_runs(epsilons=[0.5, 1.0], seeds=[0], vary=("model.activation", ["tanh", "relu"]), baseline=True)
    assert [p["name"] for p in plan] == [
        "eps0.5_seed0_model.activation=tanh", "eps0.5_seed0_model.activation=relu",
        "eps1_seed0_model.activation=tanh", "eps1_seed0_model.activation=relu",
        "baseline_seed0_model.activation=tanh", "baseline_seed0_model.activation=relu"]
    assert {p["target_epsilon"] for p in plan[-2:]} == {None}
    plan = plan_runs(epsilons=[1.0], seeds=[0], vary=("optim.ema_decay", [None, 0.999]), baseline=False)
    assert [p["name"] for p in plan] == ["eps1_seed0_optim.ema_decay=null", "eps1_seed0_optim.ema_decay=0.999"]

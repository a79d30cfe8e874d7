"""``dpvision train --config recipes/<x>.yaml`` (issue 8): every dataset, baseline and DP, both engines, resume.

Each dataset is a tiny fixture in its exact on-disk format (tests/data_fixtures.py); the recipe's model,
optimizer and privacy settings are kept and only the sizes are shrunk by flags (and, for CIFAR-10 in the
matrix, the model: WideResNet-16-4 runs in its own slow test). A resumed run must equal the uninterrupted
one exactly: metrics rows (all but the seconds), final weights, ε.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpvision.cli import main
from dpvision.jobs.train import run
from tests.conftest import REPO_ROOT
from tests.data_fixtures import write_celeba_folder, write_cifar10, write_idx_mnist, write_imagefolder
from tests.job_helpers import (
    Interrupt, assert_same_run, assert_same_weights, exit_code, interrupt_at, metrics, rdp_epsilon, summary,
    train_config,
)  # fmt: skip

RECIPES = REPO_ROOT / "recipes"
RUN_FILES = ("config.yaml", "metrics.csv", "summary.json", "model.pt", "curves.png", "checkpoint.pt")
# Flags that shrink each recipe to a few steps on its fixture (2 epochs of 2 steps: q = 1/2).
TINY = {
    "mnist": ["--config", RECIPES / "mnist_seed.yaml", "--k", "40", "--batch-size", "20", "--epochs", "2"],
    "fashion-mnist": ["--config", RECIPES / "fashion_mnist.yaml", "--batch-size", "20", "--epochs", "2"],
    "cifar10": ["--config", RECIPES / "cifar10_wrn16_4.yaml", "--model", "sample_convnet", "--batch-size", "20",
                "--epochs", "2"],
    "imagefolder": ["--config", RECIPES / "imagefolder.yaml", "--image-size", "16", "--batch-size", "8",
                    "--epochs", "2"],
    "celeba": ["--config", RECIPES / "celeba_seed.yaml", "--batch-size", "8", "--epochs", "2"],
}
NUM_TRAIN = {"mnist": 40, "fashion-mnist": 40, "cifar10": 40, "imagefolder": 16, "celeba": 16}


@pytest.fixture(scope="module")
def roots(tmp_path_factory, tiny_mnist_root) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("job_data")
    write_idx_mnist(base / "fashion", 40, 20, folder="FashionMNIST", seed=1)
    write_cifar10(base / "cifar", 40, 10)
    write_imagefolder(base / "folder", ("cat", "dog"), 8, 16)  # 16 train, 16 val, 16 test
    write_celeba_folder(base / "celeba", 16, 8, 8, size=16)
    return {"mnist": tiny_mnist_root, "fashion-mnist": base / "fashion", "cifar10": base / "cifar",
            "imagefolder": base / "folder", "celeba": base / "celeba"}


def argv_for(dataset: str, roots, runs_dir: Path, run_name: str, *extra) -> list[str]:
    return [*TINY[dataset], "--data-root", roots[dataset], "--device", "cpu", "--quiet", "--runs-dir", runs_dir,
            "--run-name", run_name, *extra]


# The whole matrix is slow on 2 cores; MNIST with DP on the fast engine and the baseline on Opacus's stays
# in the quick loop (tests/test_resume.py resumes both engines with DP too).
QUICK = {("mnist", "fast", True), ("mnist", "opacus", False)}
MATRIX = [pytest.param(dataset, engine, dp, id=f"{dataset}-{engine}-{'dp' if dp else 'baseline'}",
                       marks=() if (dataset, engine, dp) in QUICK else pytest.mark.slow)
          for dataset in TINY for engine in ("fast", "opacus") for dp in (True, False)]


@pytest.mark.parametrize("dataset, engine, dp", MATRIX)
def test_recipe_runs_and_resumes_identically(dataset, engine, dp, roots, tmp_path):
    extra = ["--engine", engine, *([] if dp else ["--disable-dp"])]
    assert exit_code(main, ["train", *argv_for(dataset, roots, tmp_path, "full", *extra)]) == 0
    full = tmp_path / dataset / "full"
    for name in RUN_FILES:
        assert (full / name).is_file(), name
    result = summary(full)
    assert result["dataset"] == dataset and result["engine"] == engine and result["dp"] is dp
    assert result["num_train"] == NUM_TRAIN[dataset] and result["sample_rate"] == 0.5
    assert result["steps"] == 4 and result["epochs_completed"] == 2
    assert set(result["epsilons"]) == {"rdp", "prv", "pld"}
    assert 0 <= result["test_accuracy"] <= 1
    rows = metrics(full)
    assert [(r["epoch"], r["steps"]) for r in rows] == [("1", "2"), ("2", "4")]
    if dp:
        sigma, delta = result["noise_multiplier"], result["delta"]
        assert sigma > 0 and result["epsilon"] == pytest.approx(rdp_epsilon(sigma, 0.5, 4, delta), rel=1e-12)
        for row, steps in zip(rows, (2, 4)):
            assert float(row["epsilon"]) == pytest.approx(rdp_epsilon(sigma, 0.5, steps, delta), rel=1e-12)
        if dataset in ("imagefolder", "celeba"):  # delta: auto
            assert delta == 1 / (10 * NUM_TRAIN[dataset])
    else:
        assert result["epsilon"] == "inf" and set(result["epsilons"].values()) == {"inf"}
        assert result["noise_multiplier"] == 0.0 and {r["epsilon"] for r in rows} == {"inf"}

    # Interrupted in the middle of epoch 2 (after the checkpoint of epoch 1), then resumed.
    config = train_config(argv_for(dataset, roots, tmp_path, "resumed", *extra))
    with pytest.raises(Interrupt):
        run(config, hook=interrupt_at("step", 1, epoch_of_step=2))
    resumed = tmp_path / dataset / "resumed"
    assert len(metrics(resumed)) == 1 and not (resumed / "summary.json").exists()
    run(resume=resumed)
    assert_same_run(resumed, full)
    assert summary(resumed)["resumed"] is True
    if dataset == "celeba":  # the recipe judges the best validation epoch's weights
        assert_same_weights(resumed, full, "model_best.pt")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fast", "opacus"])
def test_cifar10_recipe_trains_wide_resnet(engine, roots, tmp_path):
    """The CIFAR-10 recipe's own model, WideResNet-16-4 (GroupNorm): 8 images, one DP step."""
    argv = ["--config", RECIPES / "cifar10_wrn16_4.yaml", "--data-root", roots["cifar10"], "--k", "8",
            "--batch-size", "8", "--epochs", "1", "--engine", engine, "--device", "cpu", "--quiet",
            "--runs-dir", tmp_path, "--run-name", "wrn"]
    assert exit_code(main, ["train", *argv]) == 0
    result = summary(tmp_path / "cifar10" / "wrn")
    assert result["model"] == "wrn16_4" and result["engine"] == engine and result["steps"] == 1
    assert result["sample_rate"] == 1.0 and result["target_epsilon"] == 8.0
    assert result["epsilon"] == pytest.approx(rdp_epsilon(result["noise_multiplier"], 1.0, 1, 1e-5), rel=1e-12)
    assert 8.0 * (1 - 1e-3) <= result["epsilon"] <= 8.0


def test_resolved_config_is_a_recipe_that_reproduces_the_run(roots, tmp_path, capsys):
    assert exit_code(main, ["train", *argv_for("mnist", roots, tmp_path, "first")]) == 0
    first = tmp_path / "mnist" / "first"
    assert exit_code(main, ["train", "--config", first / "config.yaml", "--run-name", "again"]) == 0
    again = tmp_path / "mnist" / "again"
    assert_same_run(again, first)
    assert (again / "config.yaml").read_text() == (first / "config.yaml").read_text().replace(
        "run_name: first", "run_name: again")


def test_summary_json_fields_and_closing_lines(roots, tmp_path, capsys):
    """Issue 14 item 3: every job ends by saying where its outputs are, its accuracy, ε (all accountants), time."""
    assert exit_code(main, ["train", *argv_for("mnist", roots, tmp_path, "s", "--accountant", "prv")]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "mnist" / "s"
    result = summary(path)
    for key in ("test_accuracy", "epsilon", "epsilons", "delta"):
        assert key in result
    assert result["accountant"] == "prv" and result["epsilon"] == result["epsilons"]["prv"]
    assert result["delta"] == 1e-5 and result["noise_multiplier"] == 1.3
    eps = result["epsilons"]
    lines = out.strip().splitlines()
    assert len(lines) == 2, out  # --quiet: nothing but the closing summary
    assert re.fullmatch(r"Done in \d+\.\ds: test accuracy (\S+) \| ε = (\S+) \(prv; rdp (\S+), pld (\S+)\) "
                        r"at δ = 1e-05 after 4 steps", lines[0]), lines[0]
    assert lines[0].split(": test accuracy ")[1].startswith(f"{result['test_accuracy']:.4f} |")
    assert (f"ε = {eps['prv']:.4f} (prv; rdp {eps['rdp']:.4f}, pld {eps['pld']:.4f})") in lines[0]
    # Issue 21 item 6: the checkpoint is named too (it is what --resume reads)
    assert lines[1] == (f"Outputs: {path}/ (config.yaml, metrics.csv, summary.json, model.pt, curves.png, "
                        "checkpoint.pt)")


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
def test_gdp_accountant_run_reports_opacus_gaussian_epsilon(roots, tmp_path):
    """--accountant gdp (an approximation): the run finishes, its ε is Opacus's GaussianAccountant for the
    ledger, and metrics.csv keeps only the rigorous columns (no epsilon_gdp)."""
    from opacus.accountants import GaussianAccountant

    assert exit_code(main, ["train", *argv_for("mnist", roots, tmp_path, "g", "--accountant", "gdp")]) == 0
    path = tmp_path / "mnist" / "g"
    result = summary(path)
    gaussian = GaussianAccountant()
    gaussian.history = [(result["noise_multiplier"], result["sample_rate"], result["steps"])]
    assert result["accountant"] == "gdp" and result["steps"] == 4
    assert result["epsilon"] == gaussian.get_epsilon(delta=result["delta"], poisson=True)
    assert set(result["epsilons"]) == {"rdp", "prv", "pld"}
    rows = metrics(path)
    assert "epsilon_gdp" not in rows[-1] and {"epsilon_rdp", "epsilon_prv", "epsilon_pld"} <= set(rows[-1])
    assert float(rows[-1]["epsilon"]) == pytest.approx(result["epsilon"])


def test_baseline_closing_line_says_no_dp(roots, tmp_path, capsys):
    assert exit_code(main, ["train", *argv_for("mnist", roots, tmp_path, "b", "--disable-dp")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert re.fullmatch(r"Done in \d+\.\ds: test accuracy \d\.\d{4} \| no DP \(ε = ∞\)", line), line


def test_small_data_warning_is_printed_before_training(roots, tmp_path, capsys):
    """Issue 8 item 10: fewer than 200 optimizer steps: the advice comes before the first step."""
    seen = []

    def hook(event, n):
        if not seen:
            seen.append(capsys.readouterr().err)

    config = train_config(argv_for("mnist", roots, tmp_path, "w", "--disable-dp"))
    config = config.with_overrides({"run.quiet": False})
    run(config, hook=hook)
    assert ("warning: only 4 optimizer steps (2 epochs of 2 steps, batch size 20 for 40 examples): too few to "
            "learn; try --batch-size 20 --epochs 100 (200 steps)") in seen[0].splitlines()


def test_few_steps_advice_for_the_issue_example():
    """482 CelebA images, batch 256, 10 epochs: 20 steps; the advice gives a batch and epochs with >= 200
    (under DP the same batch: tests/test_few_steps_advice.py checks its arithmetic)."""
    from dpvision.jobs.config import TrainConfig
    from dpvision.jobs.setup import few_steps_advice, plan_privacy

    config = TrainConfig.from_dict({"optim": {"batch_size": 256, "epochs": 10}})
    advice = few_steps_advice(config, plan_privacy(config, num_train=482))
    assert advice.startswith("only 20 optimizer steps (10 epochs of 2 steps, batch size 256 for 482 examples): too "
                             "few to learn; try --batch-size 256 --epochs 100 (200 steps; under DP")  # DP keeps B
    baseline = config.deactivated()
    assert few_steps_advice(baseline, plan_privacy(baseline, num_train=482)).endswith(
        "try --batch-size 32 --epochs 13 (208 steps)")
    enough = TrainConfig.from_dict({"optim": {"batch_size": 256, "epochs": 100}})
    assert few_steps_advice(enough, plan_privacy(enough, num_train=482)) is None


@pytest.mark.slow
def test_python_m_dpvision_train(roots, tmp_path):
    """``python -m dpvision`` is the ``dpvision`` command (launchers such as torchrun need it)."""
    result = subprocess.run([sys.executable, "-m", "dpvision", "train", *map(str, argv_for(
        "mnist", roots, tmp_path, "m", "--disable-dp"))], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "mnist" / "m"
    assert result.stdout.strip().splitlines()[-1].startswith(f"Outputs: {path}/")
    assert summary(path)["epsilon"] == "inf" and len(metrics(path)) == 2


def test_python_m_dpvision_refuses_bad_input_in_one_line(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "dpvision", "train", "--epochs", "0"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr == ("dpvision train: error: optim.epochs must be an integer between "
                                                  "1 and 100000, got 0 (flags)\n")
    assert list(tmp_path.iterdir()) == []


def test_tensorboard(roots, tmp_path, capsys):
    argv = ["train", *argv_for("mnist", roots, tmp_path, "tb", "--disable-dp", "--tensorboard")]
    if importlib.util.find_spec("tensorboard") is None:
        assert exit_code(main, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "pip install" in err and "tensorboard" in err, err
        assert not (tmp_path / "mnist").exists()  # refused before anything is written
    else:
        assert exit_code(main, argv) == 0
        events = list((tmp_path / "mnist" / "tb" / "tensorboard").glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0
        assert capsys.readouterr().out.strip().splitlines()[-1].endswith("checkpoint.pt, tensorboard/)")


def test_every_run_folder_file_is_written_for_a_budget_stop(roots, tmp_path):
    """A run stopped by its privacy budget still ends with every file and an ε within the budget."""
    budget = rdp_epsilon(1.3, 0.5, 3, 1e-5)  # exactly 3 steps fit
    argv = argv_for("mnist", roots, tmp_path, "budget", "--max-epsilon", repr(budget), "--epochs", "3")
    assert exit_code(main, ["train", *argv]) == 0
    path = tmp_path / "mnist" / "budget"
    for name in RUN_FILES:
        assert (path / name).is_file(), name
    result = summary(path)
    assert result["stopped_early"] is True and result["steps"] == 3 and result["epochs_completed"] == 2
    assert result["epsilon"] == pytest.approx(budget, rel=1e-12) and result["max_epsilon"] == budget
    assert not math.isinf(result["epsilon"])


@pytest.mark.parametrize(("precision", "given"), [("bf16", "bf16"), ("auto", None)])
def test_run_precision_reaches_the_fast_engine(precision, given, roots, tmp_path, monkeypatch):
    """``run.precision`` is handed to the fast engine (which keeps exact fp32 on the CPU); ``auto`` leaves its
    default."""
    import dpvision.jobs.setup as setup

    seen, real = [], setup.build_engine
    monkeypatch.setattr(setup, "build_engine", lambda name, **kw: (seen.append(kw), real(name, **kw))[1])
    code = exit_code(main, ["train", *argv_for("mnist", roots, tmp_path, "p", "--epochs", "1", "--set",
                                               f"run.precision={precision}")])
    assert code == 0 and seen[0]["options"].precision == given
    assert "precision: " + precision in (tmp_path / "mnist" / "p" / "config.yaml").read_text()

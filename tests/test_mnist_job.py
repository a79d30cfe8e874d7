"""``python mnist.py`` (the MNIST seed's front-end of the one training job) end to end, tiny sizes; bad input.

Runs on the tiny synthetic MNIST (tests/conftest.py: 600 train / 200 test images in the exact IDX format):
nothing here needs real digits. The seed CSV's exact bytes on real MNIST are tests/test_golden.py's.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from opacus.accountants import PRVAccountant

from dpvision.cli import main as dpvision_main
from dpvision.jobs.mnist_seed import SEED_CSV_COLUMNS, main as mnist_main
from tests.conftest import REPO_ROOT
from tests.job_helpers import (
    assert_same_run, exit_code, metrics, rdp_epsilon, read_csv, summary, working_dir,
)  # fmt: skip

TINY = ["--k", "40", "--batch-size", "20", "--epochs", "2", "--test-batch-size", "2000", "--quiet"]
CSV_NAME = "mnist_0.15_1.3_1.0_20_2_0.3_40.csv"


def run_cli(args: list, cwd: Path, data_root: Path) -> int:
    """``mnist.py --data-root DATA <args>`` in-process with ``cwd`` as working directory (outputs land there)."""
    with working_dir(cwd):
        return exit_code(mnist_main, ["--data-root", data_root, *args])


@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, tiny_mnist_root):
    """One DP run with the seed's flags (q = 0.5, 2 steps an epoch, 2 epochs), and what it printed."""
    cwd = tmp_path_factory.mktemp("seed_run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_cli(TINY, cwd, tiny_mnist_root) == 0
    return cwd, out.getvalue()


def test_cli_end_to_end_csv_and_epsilon(seed_run):
    cwd, _ = seed_run
    csv_path = cwd / "mnist" / CSV_NAME
    assert csv_path.read_text().splitlines()[0] == ",".join(SEED_CSV_COLUMNS)
    rows = read_csv(csv_path)
    assert [int(r["Epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= float(row["Train Accuracy"]) <= 1.0 and 0.0 <= float(row["Test Accuracy"]) <= 1.0
        assert float(row["Delta"]) == 1e-5
    # q = 1/ceil(40/20) = 0.5, 2 steps an epoch: ε must be Opacus's RDP ε for exactly those steps.
    for epoch, row in enumerate(rows, start=1):
        assert float(row["Epsilon"]) == pytest.approx(rdp_epsilon(1.3, 0.5, 2 * epoch, 1e-5), rel=1e-12)

    run = cwd / "runs" / "mnist" / csv_path.stem
    config = yaml.safe_load((run / "config.yaml").read_text())  # nested now: the recipe plus "resolved"
    assert config["resolved"]["noise_multiplier"] == 1.3 and config["resolved"]["sample_rate"] == 0.5
    assert config["data"]["k"] == 40 and config["dp"]["noise_multiplier"] == 1.3
    assert config["resolved"]["front_end"]["seed_csv_name"] == CSV_NAME
    rows_m = metrics(run)
    assert [int(m["steps"]) for m in rows_m] == [2, 4]
    assert set(rows_m[0]) >= {"epoch", "steps", "sample_rate", "noise_multiplier", "max_grad_norm", "train_loss",
                              "train_accuracy", "test_accuracy", "epsilon", "delta", "accountant",
                              "epsilon_rdp", "epsilon_prv", "epsilon_pld"}
    # the seed CSV is metrics.csv in the seed's columns
    assert [r["Epsilon"] for r in rows] == [m["epsilon"] for m in rows_m]
    assert [r["Test Accuracy"] for r in rows] == [m["test_accuracy"] for m in rows_m]
    state = torch.load(run / "model.pt", weights_only=True)
    assert set(state) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                          "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert (run / CSV_NAME).read_bytes() == csv_path.read_bytes()  # the run folder's own copy


def test_prv_epsilon_is_opacus_prv(seed_run):
    """ε under the other accountants: Opacus's PRVAccountant and dp_accounting's PLDAccountant for the same steps."""
    cwd, _ = seed_run
    result = summary(cwd / "runs" / "mnist" / Path(CSV_NAME).stem)
    accountant = PRVAccountant()
    accountant.history = [(1.3, 0.5, 4)]
    assert result["epsilons"]["prv"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    from dp_accounting import dp_event, pld

    pld_accountant = pld.PLDAccountant()
    pld_accountant.compose(dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.5, dp_event.GaussianDpEvent(1.3)), 4))
    assert result["epsilons"]["pld"] == pytest.approx(pld_accountant.get_epsilon(1e-5), rel=1e-9)
    assert result["epsilons"]["prv"] <= result["epsilons"]["rdp"] and result["epsilon"] == result["epsilons"]["rdp"]


def test_closing_summary_names_outputs_accuracy_every_epsilon_and_time(seed_run):
    """Issue 14 item 3: the run ends with where its outputs are, accuracy, ε under every accountant, wall time."""
    cwd, printed = seed_run
    run = Path("runs") / "mnist" / Path(CSV_NAME).stem
    result = summary(cwd / run)
    eps = result["epsilons"]
    lines = printed.strip().splitlines()
    assert len(lines) == 3, printed  # --quiet: only the summary
    assert re.fullmatch(r"Done in \d+\.\ds: test accuracy \d\.\d{4} \| ε = \S+ \(rdp; prv \S+, pld \S+\) at "
                        r"δ = 1e-05 after 4 steps", lines[0]), lines[0]
    assert f"test accuracy {result['test_accuracy']:.4f} |" in lines[0]
    assert f"ε = {eps['rdp']:.4f} (rdp; prv {eps['prv']:.4f}, pld {eps['pld']:.4f})" in lines[0]
    assert lines[1] == (f"Outputs: {run}/ (config.yaml, metrics.csv, summary.json, model.pt, curves.png, "
                        "checkpoint.pt)")
    assert lines[2] == f"Seed CSV: {Path('mnist') / CSV_NAME}"


def test_seed_run_folder_is_a_recipe_for_dpvision_train(seed_run, tmp_path):
    """mnist.py is a front-end of the job: its config.yaml, given to ``dpvision train``, reproduces the run."""
    cwd, _ = seed_run
    run = cwd / "runs" / "mnist" / Path(CSV_NAME).stem
    assert exit_code(dpvision_main, ["train", "--config", run / "config.yaml", "--runs-dir", tmp_path,
                                     "--run-name", "again"]) == 0
    assert_same_run(tmp_path / "mnist" / "again", run)


def test_same_seed_same_csv_bytes(seed_run, tmp_path, tiny_mnist_root):
    cwd, _ = seed_run
    first = (cwd / "mnist" / CSV_NAME).read_bytes()
    assert run_cli(TINY, tmp_path, tiny_mnist_root) == 0
    assert (tmp_path / "mnist" / CSV_NAME).read_bytes() == first
    assert run_cli([*TINY, "--seed", "1"], tmp_path, tiny_mnist_root) == 0
    assert (tmp_path / "mnist" / CSV_NAME).read_bytes() != first


@pytest.mark.parametrize("data", ["tiny", "real"])
def test_disable_dp_epsilon_is_inf(data, tmp_path, request):
    """60 plain SGD steps learn: far above chance (0.1) on real digits, clearly above it on the tiny ones
    (whose classes differ only in mean brightness, and overlap)."""
    root = request.getfixturevalue("tiny_mnist_root" if data == "tiny" else "mnist_root")
    assert run_cli([*TINY, "--disable-dp", "--epochs", "1", "--batch-size", "10", "--k", "600"], tmp_path, root) == 0
    rows = read_csv(tmp_path / "mnist" / "mnist_0.15_1.3_1.0_10_1_0.3_600.csv")
    assert rows[0]["Epsilon"] == "inf"
    assert float(rows[0]["Test Accuracy"]) > (0.3 if data == "real" else 0.2)
    run = tmp_path / "runs" / "mnist" / "mnist_0.15_1.3_1.0_10_1_0.3_600"
    assert summary(run)["epsilons"] == {"rdp": "inf", "prv": "inf", "pld": "inf"}
    assert summary(run)["steps"] == 60


def test_epsilon_target_calibrates_sigma(tmp_path, tiny_mnist_root):
    args = ["--k", "40", "--batch-size", "20", "--epochs", "1", "--epsilon", "4", "--quiet"]
    assert run_cli(args, tmp_path, tiny_mnist_root) == 0
    [csv_path] = (tmp_path / "mnist").iterdir()
    final = float(read_csv(csv_path)[-1]["Epsilon"])
    assert 4 * 0.999 <= final <= 4.0
    [run] = (tmp_path / "runs" / "mnist").iterdir()
    sigma = yaml.safe_load((run / "config.yaml").read_text())["resolved"]["noise_multiplier"]
    assert csv_path.name == f"mnist_0.15_{sigma:.4g}_1.0_20_1_4.0_40.csv" and sigma != 1.3
    assert final == pytest.approx(rdp_epsilon(sigma, 0.5, 2, 1e-5), rel=1e-12)


BAD_INPUTS = [
    (["--sigma", "-1"], "--sigma"),
    (["--lr", "-0.1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--max-per-sample-grad-norm", "0"], "--max-per-sample-grad-norm"),
    (["--delta", "0"], "--delta"),
    (["--delta", "1"], "--delta"),
    (["--delta", "often"], "--delta"),
    (["--k", "0"], "--k"),
    (["--k", "601"], "--k"),  # more than the 600 training images
    (["--k", "100", "--batch-size", "101"], "--batch-size"),
    (["--epsilon", "1e-9", "--k", "100", "--batch-size", "100"], "--epsilon"),
    (["--epsilon", "1", "--sigma", "1"], "--sigma"),
    (["--epsilon", "1", "--target-epsilon", "2"], "--target-epsilon"),
    (["--accountant", "moments"], "--accountant"),
    (["--engine", "jax"], "--engine"),
    (["--device", "tpu"], "--device"),
    (["--batch-size", "many"], "--batch-size"),
    (["--run-name", "../x"], "--run-name"),
    (["--delta", "0.5", *TINY], "--delta 0.5 is at least 1/N = 0.025 (N = 40 training examples)"),  # issue 21
    (["--delta", "0.025", *TINY], "--allow-large-delta"),  # exactly 1/N
    (["--epcohs", "1"], "unrecognized argument --epcohs (did you mean --epochs?)"),
    (["--clipping", "flat"], "unrecognized argument --clipping"),  # the seed has no such flag
]


@pytest.mark.parametrize("args,flag", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_one_line_writes_nothing(args, flag, tmp_path, tiny_mnist_root, capsys):
    assert run_cli(args, tmp_path, tiny_mnist_root) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err and flag in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(tmp_path, tiny_mnist_root, capsys):
    assert run_cli(["--device", "cuda", *TINY], tmp_path, tiny_mnist_root) == 2
    assert "--device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir_is_refused(tmp_path, tiny_mnist_root, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert run_cli(["--out-dir", str(locked / "out")], tmp_path, tiny_mnist_root) == 2
    assert "--out-dir" in capsys.readouterr().err


def test_out_dir_under_a_file_is_refused(tmp_path, tiny_mnist_root, capsys):
    (tmp_path / "afile").write_text("x")
    assert run_cli(["--out-dir", "afile/out"], tmp_path, tiny_mnist_root) == 2
    err = capsys.readouterr().err
    assert "--out-dir" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_large_delta_runs_only_with_allow_large_delta(tmp_path, tiny_mnist_root):
    args = ["--k", "100", "--batch-size", "50", "--epochs", "1", "--delta", "0.02", "--quiet"]
    assert run_cli(args, tmp_path, tiny_mnist_root) == 2
    with pytest.warns(UserWarning, match=r"dp.delta 0\.02 is above 1/\(10 N\) = 0\.001"):
        assert run_cli([*args, "--allow-large-delta"], tmp_path, tiny_mnist_root) == 0
    assert (tmp_path / "mnist" / "mnist_0.15_1.3_1.0_50_1_0.3_100.csv").exists()


def test_missing_data_offline_says_where_to_put_files(tmp_path, capsys, monkeypatch):
    import dpvision.data.mnist as mnist_data

    def offline(root):
        raise OSError("network unreachable")

    monkeypatch.setattr(mnist_data, "_download", offline)
    assert exit_code(mnist_main, ["--data-root", tmp_path / "nodata", "--out-dir", tmp_path / "o",
                                  "--runs-dir", tmp_path / "r", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "network unreachable" in err
    assert str(tmp_path / "nodata" / "MNIST" / "raw") in err and "train-images-idx3-ubyte.gz" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_python_mnist_py_subprocess(tmp_path, tiny_mnist_root):
    """The seed's command itself, as a user types it (not quiet: per-epoch lines, then the summary)."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "mnist.py"), "--data-root", str(tiny_mnist_root),
                             "--k", "40", "--batch-size", "20", "--epochs", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ε = " in result.stdout and "δ = 1e-05" in result.stdout
    assert re.search(r"^Epoch   1 \| train loss ", result.stdout, re.M)
    assert result.stdout.strip().splitlines()[-1] == "Seed CSV: mnist/mnist_0.15_1.3_1.0_20_1_0.3_40.csv"
    assert (tmp_path / "mnist" / "mnist_0.15_1.3_1.0_20_1_0.3_40.csv").exists()
    assert "Traceback" not in result.stderr
    assert "warning: only 2 optimizer steps" in result.stderr  # the small-data advice


def test_large_delta_runs_only_when_insisted_and_warns_once_in_the_seeds_words(tmp_path, tiny_mnist_root):
    """Issue 21: δ >= 1/N used to run silently ("ε = 0.0000 (δ = 0.5)"); between 1/(10 N) and 1/N it warns."""
    base = [sys.executable, str(REPO_ROOT / "mnist.py"), "--data-root", str(tiny_mnist_root), *TINY, "--epochs", "1"]
    result = subprocess.run([*base, "--delta", "0.01"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")})
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "delta" in line]
    assert warned == ["warning: --delta 0.01 is above 1/(10 N) = 0.0025 (N = 40): delta should be well below 1/N "
                      "('auto' gives 1/(10 N))"]
    with working_dir(tmp_path):
        assert exit_code(mnist_main, ["--data-root", tiny_mnist_root, *TINY, "--epochs", "1", "--delta", "0.5",
                                      "--allow-large-delta", "--run-name", "insisted"]) == 0
    assert summary(tmp_path / "runs" / "mnist" / "insisted")["delta"] == 0.5

"""``python mnist.py`` end to end on the real MNIST, tiny sizes; every bad input of the foundation issue."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from opacus.accountants import RDPAccountant

from dpvision.cli import mnist_main
from dpvision.mnist import SEED_CSV_COLUMNS
from tests.conftest import REPO_ROOT

TINY = ["--k", "600", "--batch-size", "60", "--epochs", "2", "--test-batch-size", "2000", "--quiet"]


def run_cli(args: list[str], cwd: Path, mnist_root: Path) -> None:
    """Run ``mnist.py`` in-process with ``cwd`` as working directory (outputs land there)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert mnist_main(["--data-root", str(mnist_root), *args]) == 0
    finally:
        os.chdir(old)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_cli_end_to_end_csv_and_epsilon(tmp_path, mnist_root):
    run_cli(TINY, tmp_path, mnist_root)
    csv_path = tmp_path / "mnist" / "mnist_0.15_1.3_1.0_60_2_0.3_600.csv"
    assert csv_path.read_text().splitlines()[0] == ",".join(SEED_CSV_COLUMNS)
    rows = read_rows(csv_path)
    assert [int(r["Epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= float(row["Train Accuracy"]) <= 1.0 and 0.0 <= float(row["Test Accuracy"]) <= 1.0
        assert float(row["Delta"]) == 1e-5
    # q = 1/ceil(600/60) = 0.1, 10 steps an epoch: ε must be Opacus's RDP ε for exactly those steps.
    for epoch, row in enumerate(rows, start=1):
        accountant = RDPAccountant()
        accountant.history = [(1.3, 0.1, 10 * epoch)]
        assert float(row["Epsilon"]) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)

    run = tmp_path / "runs" / "mnist" / csv_path.stem
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["noise_multiplier"] == 1.3 and config["sample_rate"] == 0.1 and config["k"] == 600
    metrics = read_rows(run / "metrics.csv")
    assert [int(m["steps"]) for m in metrics] == [10, 20]
    assert set(metrics[0]) >= {"epoch", "steps", "sample_rate", "noise_multiplier", "max_grad_norm", "train_loss",
                                "train_accuracy", "test_accuracy", "epsilon", "delta", "seconds"}
    state = torch.load(run / "model.pt", weights_only=True)
    assert set(state) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                          "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_same_seed_same_csv_bytes(tmp_path, mnist_root):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run_cli(TINY, tmp_path / name, mnist_root)
    first = (tmp_path / "a" / "mnist" / "mnist_0.15_1.3_1.0_60_2_0.3_600.csv").read_bytes()
    assert first == (tmp_path / "b" / "mnist" / "mnist_0.15_1.3_1.0_60_2_0.3_600.csv").read_bytes()
    (tmp_path / "c").mkdir()
    run_cli([*TINY, "--seed", "1"], tmp_path / "c", mnist_root)
    assert first != (tmp_path / "c" / "mnist" / "mnist_0.15_1.3_1.0_60_2_0.3_600.csv").read_bytes()


def test_disable_dp_epsilon_is_inf(tmp_path, mnist_root):
    run_cli([*TINY, "--disable-dp", "--epochs", "1", "--batch-size", "10"], tmp_path, mnist_root)
    rows = read_rows(tmp_path / "mnist" / "mnist_0.15_1.3_1.0_10_1_0.3_600.csv")
    assert rows[0]["Epsilon"] == "inf"
    assert float(rows[0]["Test Accuracy"]) > 0.3  # 60 plain SGD steps: far above chance (0.1)


def test_epsilon_target_calibrates_sigma(tmp_path, mnist_root):
    run_cli(["--k", "600", "--batch-size", "60", "--epochs", "1", "--epsilon", "4", "--quiet"], tmp_path, mnist_root)
    [csv_path] = (tmp_path / "mnist").iterdir()
    final = float(read_rows(csv_path)[-1]["Epsilon"])
    assert 4 * 0.99 <= final <= 4.0
    [run] = (tmp_path / "runs" / "mnist").iterdir()
    sigma = yaml.safe_load((run / "config.yaml").read_text())["noise_multiplier"]
    assert f"_{sigma:.4g}_" in csv_path.name and sigma != 1.3


BAD_INPUTS = [
    (["--sigma", "-1"], "--sigma"),
    (["--lr", "-0.1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--max-per-sample-grad-norm", "0"], "--max-per-sample-grad-norm"),
    (["--delta", "0"], "--delta"),
    (["--delta", "1"], "--delta"),
    (["--k", "0"], "--k"),
    (["--k", "60001"], "--k"),
    (["--k", "100", "--batch-size", "101"], "--batch-size"),
    (["--epsilon", "1e-9", "--k", "100", "--batch-size", "100"], "--epsilon"),
    (["--epsilon", "1", "--sigma", "1"], "--sigma"),
    (["--device", "tpu"], "--device"),
    (["--batch-size", "many"], "--batch-size"),
]


@pytest.mark.parametrize("args,flag", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_one_line_writes_nothing(args, flag, tmp_path, mnist_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args, tmp_path, mnist_root)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused(tmp_path, mnist_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--device", "cuda"], tmp_path, mnist_root)
    assert exit_info.value.code == 2 and "--device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir_is_refused(tmp_path, mnist_root, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--out-dir", str(locked / "out")], tmp_path, mnist_root)
    assert exit_info.value.code == 2 and "--out-dir" in capsys.readouterr().err


def test_out_dir_under_a_file_is_refused(tmp_path, mnist_root, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["--out-dir", "afile/out"], tmp_path, mnist_root)
    assert exit_info.value.code == 2 and "--out-dir" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_large_delta_warns_but_runs(tmp_path, mnist_root):
    with pytest.warns(UserWarning, match="--delta 0.02 .* too large"):
        run_cli(["--k", "100", "--batch-size", "50", "--epochs", "1", "--delta", "0.02", "--quiet"],
                tmp_path, mnist_root)
    assert (tmp_path / "mnist" / "mnist_0.15_1.3_1.0_50_1_0.3_100.csv").exists()


def test_missing_data_offline_says_where_to_put_files(tmp_path, capsys, monkeypatch):
    import dpvision.data.mnist as mnist_data

    monkeypatch.setattr(mnist_data, "_download", lambda root: (_ for _ in ()).throw(OSError("network unreachable")))
    with pytest.raises(SystemExit) as exit_info:
        mnist_main(["--data-root", str(tmp_path / "nodata"), "--out-dir", str(tmp_path / "o"),
                    "--runs-dir", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert str(tmp_path / "nodata" / "MNIST" / "raw") in err and "train-images-idx3-ubyte.gz" in err


def test_python_mnist_py_subprocess(tmp_path, mnist_root):
    """The seed's command itself, as a user types it."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / "mnist.py"), "--data-root", str(mnist_root),
                             "--k", "200", "--batch-size", "100", "--epochs", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ε = " in result.stdout and "δ = 1e-05" in result.stdout
    assert (tmp_path / "mnist" / "mnist_0.15_1.3_1.0_100_1_0.3_200.csv").exists()

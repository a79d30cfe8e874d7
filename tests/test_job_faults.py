"""Hostile input and faults around the training job (issue 13): each test names its item.

Tiny synthetic data only (tests/conftest.py's MNIST, tests/data_fixtures.py's CelebA folder). The seed runs use
``--k 40 --batch-size 20``: q = 0.5, 2 steps an epoch.
"""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dpvision.cli import main as dpvision_main
from dpvision.jobs.celeba_seed import main as celeba_main
from dpvision.jobs.mnist_seed import main as mnist_main
from dpvision.runs import RunDir
from tests.data_fixtures import write_celeba_folder
from tests.job_helpers import (
    Interrupt, assert_same_weights, exit_code, hooked, interrupt_at, metrics, read_csv, summary, working_dir,
)  # fmt: skip

TINY = ["--k", "40", "--batch-size", "20", "--epochs", "2", "--quiet"]
CSV_NAME = "mnist_0.15_1.3_1.0_20_2_0.3_40.csv"



def one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_mnist_root):
    """An uninterrupted ``mnist.py`` run (seed 0) in its own working directory."""
    cwd = tmp_path_factory.mktemp("reference")
    with working_dir(cwd):
        assert mnist_main(["--data-root", str(tiny_mnist_root), *TINY]) == 0
    return cwd


def start_interrupted(cwd: Path, data_root: Path, *extra, hook=None) -> Path:
    """``mnist.py`` in ``cwd``, stopped after epoch 1; returns its run folder."""
    with working_dir(cwd), hooked(hook or interrupt_at("epoch", 1)), pytest.raises(Interrupt):
        mnist_main(["--data-root", str(data_root), *TINY, *map(str, extra)])
    return cwd / "runs" / "mnist" / Path(CSV_NAME).stem


# -- item 3: a run without DP refuses every DP-only setting ---------------------------------------------------

DP_ONLY = [
    (mnist_main, "mnist.py", ["--disable-dp", "--epsilon", "3"], "--epsilon"),
    (mnist_main, "mnist.py", ["--disable-dp", "--max-epsilon", "1"], "--max-epsilon"),
    (mnist_main, "mnist.py", ["--disable-dp", "--sigma", "2"], "--sigma"),
    (mnist_main, "mnist.py", ["--disable-dp", "--target-epsilon", "3"], "--target-epsilon"),
    (lambda argv: dpvision_main(["train", *argv]), "dpvision train", ["--disable-dp", "--target-epsilon", "3"],
     "--target-epsilon"),
    (lambda argv: dpvision_main(["train", *argv]), "dpvision train", ["--disable-dp", "--max-epsilon", "1"],
     "--max-epsilon"),
    (lambda argv: dpvision_main(["train", *argv]), "dpvision train", ["--disable-dp", "--sigma", "2"], "--sigma"),
    (lambda argv: dpvision_main(["train", *argv]), "dpvision train",
     ["--disable-dp", "--set", "dp.noise_multiplier=2"], "dp.noise_multiplier"),
]


@pytest.mark.parametrize("main, prog, flags, named", DP_ONLY, ids=[f"{p} {' '.join(f)}" for _, p, f, _ in DP_ONLY])
def test_item3_disable_dp_refuses_dp_only_settings(main, prog, flags, named, tmp_path, tiny_mnist_root, capsys):
    argv = ["--data-root", tiny_mnist_root, "--k", "40", "--batch-size", "20", "--runs-dir", tmp_path / "runs",
            *(["--out-dir", tmp_path / "out"] if prog == "mnist.py" else []), *flags]
    assert exit_code(main, argv) == 2
    err = one_error_line(capsys, prog)
    assert f"{named} needs DP" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, named", [(["--sigma", "2"], "--sigma"),
                                          (["--target-epsilon", "3"], "--target-epsilon"),
                                          (["--max-epsilon", "1"], "--max-epsilon")])
def test_item3_celeba_baseline_refuses_dp_only_settings(flags, named, tmp_path, capsys):
    data = write_celeba_folder(tmp_path / "pre", 16, 8, 8, size=16)
    argv = ["--data", data, "--mode", "baseline", "--batch-size", "8", "--runs-dir", tmp_path / "runs", *flags]
    assert exit_code(celeba_main, argv) == 2
    assert named in one_error_line(capsys, "celeba_train.py")
    assert not (tmp_path / "runs").exists()


def test_item3_a_recipe_without_dp_but_with_a_sigma_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dp:\n  enabled: false\n  noise_multiplier: 2.0\n")
    assert exit_code(dpvision_main, ["train", "--config", recipe, "--runs-dir", tmp_path / "runs"]) == 2
    err = one_error_line(capsys, "dpvision train")
    assert str(recipe) in err and "dp.noise_multiplier needs DP" in err
    assert not (tmp_path / "runs").exists()


# -- item 4: a resume trains on the data the run started with, or not at all ----------------------------------

def write_variant(source: Path, target: Path, *, images=None, labels=None) -> Path:
    """A copy of the MNIST root ``source`` with the training images and/or labels changed (same counts)."""
    shutil.copytree(source, target)
    raw = target / "MNIST" / "raw"
    for name, change, offset in (("train-images-idx3-ubyte.gz", images, 16), ("train-labels-idx1-ubyte.gz", labels, 8)):
        if change is None:
            continue
        data = gzip.decompress((raw / name).read_bytes())
        body = change(np.frombuffer(data[offset:], dtype=np.uint8)).astype(np.uint8).tobytes()
        (raw / name).write_bytes(gzip.compress(data[:offset] + body, mtime=0))
    return target


@pytest.mark.parametrize("variant", ["inverted_images", "shifted_labels"])
def test_item4_resume_refuses_other_training_data(variant, tmp_path, tiny_mnist_root, capsys):
    run = start_interrupted(tmp_path, tiny_mnist_root)
    change = {"images": lambda x: 255 - x} if variant == "inverted_images" else {"labels": lambda y: (y + 1) % 10}
    other = write_variant(tiny_mnist_root, tmp_path / "other", **change)
    before = (run / "metrics.csv").read_bytes()
    for main, prog in ((mnist_main, "mnist.py"), (lambda argv: dpvision_main(["train", *argv]), "dpvision train")):
        assert exit_code(main, ["--resume", run, "--data-root", other]) == 2
        err = one_error_line(capsys, prog)
        assert "does not hold the training data" in err and str(run) in err
    assert (run / "metrics.csv").read_bytes() == before


def test_item4_resume_accepts_a_copy_of_the_same_data(tmp_path, tiny_mnist_root, reference):
    """The fingerprint is of the data, not of the path: a moved copy resumes to the same result."""
    run = start_interrupted(tmp_path, tiny_mnist_root)
    copy = shutil.copytree(tiny_mnist_root, tmp_path / "moved")
    with working_dir(tmp_path):
        assert mnist_main(["--resume", str(run), "--data-root", str(copy)]) == 0
    assert (tmp_path / "mnist" / CSV_NAME).read_bytes() == (reference / "mnist" / CSV_NAME).read_bytes()
    assert_same_weights(run, reference / "runs" / "mnist" / Path(CSV_NAME).stem)


def test_item4_celeba_resume_refuses_a_swapped_train_pt(tmp_path, capsys):
    data = write_celeba_folder(tmp_path / "pre", 16, 8, 8, size=16)
    other = write_celeba_folder(tmp_path / "other", 16, 8, 8, size=16, seed=1)  # same counts, other images
    argv = ["--data", data, "--mode", "dp", "--batch-size", "8", "--epochs", "2", "--quiet",
            "--runs-dir", tmp_path / "runs", "--run-name", "r"]
    with hooked(interrupt_at("epoch", 1)), pytest.raises(Interrupt):
        celeba_main([str(a) for a in argv])
    run = tmp_path / "runs" / "celeba_dp" / "r"
    stats = (data / "stats.json").read_bytes()
    shutil.copyfile(other / "train.pt", data / "train.pt")  # stats.json (and its counts) unchanged
    assert (data / "stats.json").read_bytes() == stats
    assert exit_code(celeba_main, ["--resume", run]) == 2
    err = one_error_line(capsys, "celeba_train.py")
    assert "does not hold the training data" in err and "--data" in err
    assert len(metrics(run)) == 1 and not (run / "summary.json").exists()


# -- item 9: runs that share the seed CSV's name -----------------------------------------------------------------

def test_item9_a_second_run_announces_replacing_the_shared_csv(tmp_path, tiny_mnist_root, capsys):
    with working_dir(tmp_path):
        assert mnist_main(["--data-root", str(tiny_mnist_root), *TINY]) == 0
        assert "replacing" not in capsys.readouterr().err
        first = (tmp_path / "mnist" / CSV_NAME).read_bytes()
        assert mnist_main(["--data-root", str(tiny_mnist_root), *TINY, "--seed", "1"]) == 0
    err = capsys.readouterr().err
    shared = Path("mnist") / CSV_NAME
    assert f"note: replacing {shared} (written by another run; every run folder keeps its own copy)" in err
    runs = tmp_path / "runs" / "mnist"
    first_run, second_run = runs / Path(CSV_NAME).stem, runs / f"{Path(CSV_NAME).stem}-2"
    assert (first_run / CSV_NAME).read_bytes() == first  # the first run's copy is intact
    second = (second_run / CSV_NAME).read_bytes()
    assert second != first and (tmp_path / shared).read_bytes() == second
    # each summary describes its own run: the copy beside it holds its numbers
    for run in (first_run, second_run):
        rows = read_csv(run / CSV_NAME)
        assert float(rows[-1]["Test Accuracy"]) == summary(run)["test_accuracy"]


# -- item 10: one process per run folder -----------------------------------------------------------------------

def test_item10_a_locked_run_folder_is_refused(tmp_path, tiny_mnist_root, reference, capsys):
    run = start_interrupted(tmp_path, tiny_mnist_root)
    before = {name: (run / name).read_bytes() for name in ("metrics.csv", "checkpoint.pt", "config.yaml")}
    holder = RunDir(run)
    holder.lock()  # another process training this folder (flock: a second open file description conflicts)
    try:
        for main, prog in ((mnist_main, "mnist.py"), (lambda argv: dpvision_main(["train", *argv]), "dpvision train")):
            assert exit_code(main, ["--resume", run]) == 2
            err = one_error_line(capsys, prog)
            assert f"run folder {run} is in use by process {os.getpid()}" in err
        assert {name: (run / name).read_bytes() for name in before} == before
    finally:
        holder.unlock()
    with working_dir(tmp_path):
        assert mnist_main(["--resume", str(run)]) == 0
    assert [r["epoch"] for r in metrics(run)] == ["1", "2"]
    assert (tmp_path / "mnist" / CSV_NAME).read_bytes() == (reference / "mnist" / CSV_NAME).read_bytes()


@pytest.mark.slow
def test_item10_two_resumes_at_once_and_a_real_ctrl_c(tmp_path, tiny_mnist_root, capsys):
    """A second resume while a real process trains the folder is refused; SIGINT then ends that process with
    one line and exit 130, and every epoch is in metrics.csv exactly once."""
    argv = ["--data-root", tiny_mnist_root, "--k", "40", "--batch-size", "20", "--epochs", "60", "--quiet",
            "--runs-dir", tmp_path / "runs", "--run-name", "long", "--device", "cpu"]
    with hooked(interrupt_at("epoch", 1)), pytest.raises(Interrupt):
        dpvision_main(["train", *map(str, argv)])
    run = tmp_path / "runs" / "mnist" / "long"
    proc = subprocess.Popen([sys.executable, "-m", "dpvision", "train", "--resume", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        lock = run / ".lock"  # exists only while a process holds it
        while not lock.exists() or f"process {proc.pid}" not in lock.read_text():  # polls; no timing asserted
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the resumed process never locked its run folder"
            time.sleep(0.05)
        assert exit_code(dpvision_main, ["train", "--resume", run]) == 2
        assert f"is in use by process {proc.pid}" in one_error_line(capsys, "dpvision train")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("dpvision train: interrupted") and "Traceback" not in err
    epochs = [int(r["epoch"]) for r in metrics(run)]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 60


# -- item 11: the audit checks its output before it trains --------------------------------------------------------

@pytest.fixture
def no_audit_training(monkeypatch):
    """Fail the test if the audit starts training (its checks must come first)."""
    import dpvision.audit

    def trained(*args, **kwargs):
        raise AssertionError("the audit trained before refusing its --out")

    monkeypatch.setattr(dpvision.audit, "run_audit", trained)


@pytest.mark.parametrize("out, says", [("{tmp}/afile", "not a writable directory"),
                                       ("/proc/dpvision-test", "not a writable directory")])
def test_item11_audit_refuses_its_out_before_training(out, says, tmp_path, tiny_mnist_root, no_audit_training,
                                                      capsys):
    (tmp_path / "afile").write_text("x")
    out = out.format(tmp=tmp_path)
    assert exit_code(dpvision_main, ["audit", "--sigma", "1", "--data-root", tmp_path / "no_data",
                                     "--runs-dir", out]) == 2
    err = one_error_line(capsys, "dpvision audit")
    assert says in err and "--runs-dir" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("flags, named", [(["--device", "tpu"], "--device"), (["--max-grad-norm", "inf"],
                                                                             "--max-grad-norm")])
def test_item11_audit_bad_flags_exit_2_with_one_line(flags, named, tmp_path, no_audit_training, capsys):
    assert exit_code(dpvision_main, ["audit", "--sigma", "1", "--runs-dir", tmp_path / "runs", *flags]) == 2
    assert named in one_error_line(capsys, "dpvision audit")
    assert list(tmp_path.iterdir()) == []


# -- item 12: outputs are checked up front, and a resume may move the seed CSV ---------------------------------------

def test_item12_an_impossible_out_dir_is_refused_up_front(tmp_path, tiny_mnist_root, capsys):
    with working_dir(tmp_path):
        assert exit_code(mnist_main, ["--data-root", tiny_mnist_root, *TINY, "--out-dir", "/proc/foo"]) == 2
        assert "--out-dir" in one_error_line(capsys, "mnist.py")
        assert exit_code(dpvision_main, ["train", "--data-root", tiny_mnist_root, "--k", "40", "--batch-size", "20",
                                         "--runs-dir", "/proc/foo"]) == 2
        err = one_error_line(capsys, "dpvision train")  # before the small-data warning: before loading data
        assert "run.runs_dir must be a writable directory, got '/proc/foo'" in err
    assert list(tmp_path.iterdir()) == []
    assert not Path("/proc/foo").exists()


def test_item12_a_resume_may_give_a_new_out_dir(tmp_path, tiny_mnist_root, reference, capsys):
    run = start_interrupted(tmp_path, tiny_mnist_root, "--out-dir", tmp_path / "gone")
    shutil.rmtree(tmp_path / "gone")
    (tmp_path / "gone").write_text("no longer a folder")  # the old --out-dir cannot be written any more
    assert exit_code(mnist_main, ["--resume", run]) == 2
    assert str(tmp_path / "gone") in one_error_line(capsys, "mnist.py")
    assert len(metrics(run)) == 1  # nothing lost
    with working_dir(tmp_path):
        assert exit_code(mnist_main, ["--resume", run, "--out-dir", "/proc/foo"]) == 2  # checked up front too
        assert "--out-dir" in one_error_line(capsys, "mnist.py")
        assert mnist_main(["--resume", str(run), "--out-dir", str(tmp_path / "new")]) == 0
    expected = (reference / "mnist" / CSV_NAME).read_bytes()
    assert (tmp_path / "new" / CSV_NAME).read_bytes() == expected == (run / CSV_NAME).read_bytes()
    front = yaml.safe_load((run / "config.yaml").read_text())["resolved"]["front_end"]
    assert front["out_dir"] == str(tmp_path / "new")  # recorded: config.yaml says where the seed CSV went


# -- a run folder's config.yaml that is broken on --resume ------------------------------------------------------------

BROKEN_CONFIGS = [
    ("yaml_error", lambda text: text.replace("lr: 0.15", "lr: [0.15"), "not valid YAML"),
    # (the front-ends name the field by their flag: optim.lr is --lr for mnist.py)
    ("wrong_type", lambda text: text.replace("lr: 0.15", "lr: fast"), "lr must be a number >= 0, got 'fast'"),
    ("float_epochs", lambda text: text.replace("epochs: 2", "epochs: 2.5"), "epochs must be an integer"),
    ("unknown_key", lambda text: text.replace("lr: 0.15", "lr: 0.15\n  learning_rate: 0.1"),
     "optim.learning_rate is not a setting"),
    ("bad_resolved", lambda text: text.replace("resolved:\n  noise_multiplier: 1.3",
                                               "resolved:\n  noise_multiplier: loud"), "resolved.noise_multiplier"),
    ("a_list", lambda text: "- a\n- b\n", "not the config of a dpvision training run"),
    ("not_utf8", lambda text: "\udcff", "not valid YAML"),
]


@pytest.mark.parametrize("edit, says", [c[1:] for c in BROKEN_CONFIGS], ids=[c[0] for c in BROKEN_CONFIGS])
def test_broken_config_yaml_on_resume_is_one_line_naming_the_file(edit, says, tmp_path, tiny_mnist_root, capsys,
                                                                  broken_source):
    run = tmp_path / "run"
    shutil.copytree(broken_source, run)
    text = (run / "config.yaml").read_text()
    edited = edit(text)
    assert edited != text
    (run / "config.yaml").write_bytes(edited.encode("utf-8", "surrogateescape"))
    for main, prog in ((mnist_main, "mnist.py"), (lambda argv: dpvision_main(["train", *argv]), "dpvision train"),
                       (celeba_main, "celeba_train.py")):
        assert exit_code(main, ["--resume", run]) == 2
        err = one_error_line(capsys, prog)
        assert str(run / "config.yaml") in err and says in err, err
    assert len(metrics(run)) == 1


@pytest.fixture(scope="module")
def broken_source(tmp_path_factory, tiny_mnist_root):
    """An interrupted run folder (epoch 1 of 2 done), copied by each test before it breaks the copy."""
    return start_interrupted(tmp_path_factory.mktemp("broken_source"), tiny_mnist_root)


# -- Ctrl-C: one line, exit 130, and the run resumes to the uninterrupted result ------------------------------------

@pytest.mark.parametrize("front_end", ["mnist.py", "dpvision train"])
def test_ctrl_c_is_one_line_exit_130_and_resumable(front_end, tmp_path, tiny_mnist_root, reference, capsys):
    ctrl_c = interrupt_at("step", 1, epoch_of_step=2, exc=KeyboardInterrupt)
    with working_dir(tmp_path), hooked(ctrl_c):
        if front_end == "mnist.py":
            code = exit_code(mnist_main, ["--data-root", tiny_mnist_root, *TINY])
        else:  # the mnist.py config as a recipe: the same run without the seed CSV
            recipe = reference / "runs" / "mnist" / Path(CSV_NAME).stem / "config.yaml"
            code = exit_code(dpvision_main, ["train", "--config", recipe, "--data-root", tiny_mnist_root,
                                             "--runs-dir", "runs"])
    assert code == 130
    err = capsys.readouterr().err
    [run] = (tmp_path / "runs" / "mnist").iterdir()
    # Issue 21 item 6: the line names the folder to resume (as the front-end was given it), not a placeholder
    folder = Path("runs") / "mnist" / run.name
    assert err == f"{front_end}: interrupted (--resume {folder} continues from the last completed epoch, if one was)\n"
    assert not (run / ".lock").exists()
    assert len(metrics(run)) == 1 and not (run / "summary.json").exists()
    with working_dir(tmp_path):
        main = mnist_main if front_end == "mnist.py" else (lambda argv: dpvision_main(["train", *argv]))
        assert exit_code(main, ["--resume", run]) == 0
    reference_run = reference / "runs" / "mnist" / Path(CSV_NAME).stem
    assert metrics(run) == metrics(reference_run)
    assert_same_weights(run, reference_run)

"""What the three CelebA commands promise when things go wrong: markers, --overwrite, Ctrl-C, kills, full disks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dpvision.celeba.archive import CelebaDataError
from dpvision.celeba.cli import build_subset_main, main, preprocess_main
from dpvision.celeba.demo import make_demo_archive
from dpvision.celeba.safety import (
    MARKER_FILE, check_image_id, read_marker, staging_prefix, write_marker,
)  # fmt: skip
from tests.celeba_fixtures import demo_archive, start_celeba_cli, tree_digest, wait_for_staging  # noqa: F401

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def small_subset(demo_archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "subset"
    assert build_subset_main(["--archive-dir", str(demo_archive), "--output-dir", str(out), "--total", "40",
                              "--link-mode", "copy", "--no-progress"]) == 0
    return out


def test_check_image_id():
    assert check_image_id("000001.jpg", "f:2") == "000001.jpg"
    assert check_image_id("a..b.jpg", "f:2") == "a..b.jpg"  # dots inside a name are no path
    for bad in ("", ".", "..", "../x.jpg", "a/b", "a\\b", "/abs.jpg", "C:x.jpg", "x\x00", "tab\there"):
        with pytest.raises(CelebaDataError, match=r"^f:2: image id .* is not a plain file name"):
            check_image_id(bad, "f:2")


def test_marker_round_trip_and_what_is_not_a_marker(tmp_path):
    write_marker(tmp_path, "celeba-subset")
    assert read_marker(tmp_path) == "celeba-subset"
    assert json.loads((tmp_path / MARKER_FILE).read_text()) == {
        "kind": "celeba-subset", "written_by": "dpvision celeba build-subset"}
    (tmp_path / MARKER_FILE).write_text("not json")
    assert read_marker(tmp_path) is None
    (tmp_path / MARKER_FILE).unlink()
    os.mkfifo(tmp_path / MARKER_FILE)  # never opened: a FIFO is no marker
    assert read_marker(tmp_path) is None
    with pytest.raises(ValueError, match="unknown output kind 'x'"):
        write_marker(tmp_path, "x")


def test_rerunning_the_readme_demo_command_says_what_to_do(tmp_path, capsys):
    """Issue 14: the second run of ``make-demo-archive --out X`` names --overwrite and another --out."""
    out = tmp_path / "archive"
    argv = ["make-demo-archive", "--out", str(out), "--n", "12", "--seed", "0", "--workers", "1"]
    assert main(argv) == 0
    assert json.loads((out / MARKER_FILE).read_text())["kind"] == "celeba-demo-archive"
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err == (f"error: --out {str(out)!r} already exists: pass --overwrite to replace it, "
                                       f"or choose another --out\n")
    digest = tree_digest(out)
    assert main([*argv, "--overwrite"]) == 0 and tree_digest(out) == digest  # same bytes again, marker included
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archive"]


def test_demo_overwrite_refuses_a_real_archive(tmp_path, capsys):
    real = tmp_path / "celeba"
    (real / "img_align_celeba").mkdir(parents=True)
    (real / "list_attr_celeba.csv").write_text("image_id\n")
    digest = tree_digest(real)
    assert main(["make-demo-archive", "--out", str(real), "--n", "5", "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {str(real)!r} was not written by dpvision (it has no .dpvision-output marker); "
        f"--overwrite only replaces a celeba-demo-archive folder, so remove it yourself or choose another --out\n")
    assert tree_digest(real) == digest
    subset = tmp_path / "subset"
    subset.mkdir()
    write_marker(subset, "celeba-subset")
    with pytest.raises(CelebaDataError, match="holds a celeba-subset .*only replaces a celeba-demo-archive folder"):
        make_demo_archive(subset, 5, overwrite=True)


@pytest.mark.parametrize("command", ["make-demo-archive", "build-subset", "preprocess"])
def test_full_disk_names_the_output_and_leaves_nothing(demo_archive, small_subset, tmp_path, monkeypatch, capsys, command):
    """ENOSPC while writing: one line naming the output, no temporary folder, the previous output intact."""
    import dpvision.celeba.demo as demo_module
    import dpvision.celeba.preprocessing as pre_module
    import dpvision.runs as runs_module

    def full(*args, **kwargs):
        raise ENOSPC

    out = tmp_path / "out"
    flag, argv = _argv(command, demo_archive, small_subset, out)
    assert main([*argv, "--overwrite"]) == 0  # a previous output that must survive the failed run
    digest = tree_digest(out)
    target = {"make-demo-archive": (demo_module, "atomic_write_text"),
              "build-subset": (runs_module, "atomic_write_json"),
              "preprocess": (pre_module, "atomic_torch_save")}[command]
    monkeypatch.setattr(*target, full)
    capsys.readouterr()
    assert main([*argv, "--overwrite"]) == 2
    assert capsys.readouterr().err == f"error: cannot write {flag} {str(out)!r}: No space left on device\n"
    assert tree_digest(out) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("command", ["make-demo-archive", "build-subset", "preprocess"])
def test_output_under_a_file_is_one_line(demo_archive, small_subset, tmp_path, capsys, command):
    (tmp_path / "afile").write_text("x")
    flag, argv = _argv(command, demo_archive, small_subset, tmp_path / "afile" / "out")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {flag} {str(tmp_path / 'afile' / 'out')!r}: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("command", ["build-subset", "preprocess"])
def test_ctrl_c_is_one_line_exit_130_and_nothing_is_left(demo_archive, small_subset, tmp_path, monkeypatch, capsys,
                                                          command):
    import dpvision.celeba.preprocessing as pre_module
    import dpvision.celeba.subset as subset_module

    module, name = (subset_module, "_place") if command == "build-subset" else (pre_module, "atomic_torch_save")
    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):  # Ctrl-C part-way through writing the output
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    _, argv = _argv(command, demo_archive, small_subset, tmp_path / "out")
    try:
        code = main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the command")
    assert code == 130 and capsys.readouterr().err == "interrupted\n" and len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_the_demo_workers(tmp_path):
    """A real SIGINT while worker processes draw: one line, exit 130, the staging folder removed."""
    proc = start_celeba_cli("make-demo-archive", "--out", tmp_path / "demo", "--n", "100000", "--workers", "2")
    wait_for_staging(tmp_path, "demo", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_a_killed_demo_run_is_cleaned_up_by_the_next(tmp_path, capsys):
    """SIGKILL leaves the staging folder; the next run removes it (its pid is dead) and does not fail."""
    proc = start_celeba_cli("make-demo-archive", "--out", tmp_path / "demo", "--n", "100000", "--workers", "1")
    stale = wait_for_staging(tmp_path, "demo", proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert stale.is_dir() and read_marker(stale) == "celeba-demo-archive"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    keep = [tmp_path / f"{staging_prefix(tmp_path / 'demo', 'tmp', os.getpid())}live",  # a run still going: ours
            tmp_path / f"{staging_prefix(tmp_path / 'demo', 'tmp', dead_pid)}foreign",  # not recognisably ours
            tmp_path / f"{staging_prefix(tmp_path / 'demo', 'tmp', dead_pid)}subset"]  # another command's
    for folder in keep:
        folder.mkdir()
    write_marker(keep[0], "celeba-demo-archive")
    (keep[1] / "data.bin").write_bytes(b"1")
    write_marker(keep[2], "celeba-subset")
    assert main(["make-demo-archive", "--out", str(tmp_path / "demo"), "--n", "10", "--workers", "1"]) == 0
    assert not stale.exists() and all(folder.is_dir() for folder in keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["demo", *(f.name for f in keep)])


def test_a_run_killed_between_the_two_renames_gets_its_output_back(tmp_path):
    """``--overwrite`` moves the old output aside, then renames the new one in; a kill in between loses nothing."""
    out = tmp_path / "demo"
    make_demo_archive(out, 8, workers=1)
    digest = tree_digest(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f"{staging_prefix(out, 'old', int(dead.stdout))}abc123"
    out.rename(aside)  # what a SIGKILL right after the first rename leaves
    with pytest.raises(CelebaDataError, match="already exists"):
        make_demo_archive(out, 8, workers=1)  # the previous archive is back in place, so this is refused
    assert tree_digest(out) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def _argv(command: str, archive: Path, subset: Path, out: Path) -> tuple[str, list[str]]:
    if command == "make-demo-archive":
        return "--out", [command, "--out", str(out), "--n", "6", "--workers", "1"]
    if command == "build-subset":
        return "--output-dir", [command, "--archive-dir", str(archive), "--output-dir", str(out), "--total", "20",
                                "--link-mode", "copy", "--no-progress"]
    return "--output-dir", [command, "--subset-dir", str(subset), "--output-dir", str(out), "--size", "16",
                            "--no-progress"]

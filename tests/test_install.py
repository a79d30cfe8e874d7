"""``scripts/install.py``: the README's install step picks the CPU build of PyTorch on a Linux machine without an
NVIDIA GPU, falls back to PyPI (saying so) when PyTorch's CPU index cannot be reached, and leaves everything
else to ``pip install -e .``. Nothing is installed here: the decision is tested, and ``--dry-run`` end to end.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "install.py"
UNREACHABLE = "http://127.0.0.1:9/whl/cpu"  # the discard port on this machine: nothing listens, refused at once


def load_install():
    spec = importlib.util.spec_from_file_location("install_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pins_are_the_upper_bounds_of_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    torch_max = re.search(r'"torch>=[^,]+,<=([^"]+)"', text).group(1)
    vision_max = re.search(r'"torchvision>=[^,]+,<=([^"]+)"', text).group(1)
    assert load_install().torch_pins() == [f"torch=={torch_max}", f"torchvision=={vision_max}"]


def test_linux_without_gpu_installs_the_cpu_build_first():
    install = load_install()
    commands, notes = install.plan(system="Linux", gpu=False, reachable=True, extras="test", python="py")
    pins = install.torch_pins()
    assert commands == [["py", "-m", "pip", "install", *pins, "--index-url", install.CPU_INDEX],
                        ["py", "-m", "pip", "install", "-e", ".[test]"]]
    assert "CPU build" in notes[0]


def test_unreachable_cpu_index_falls_back_to_pypi_and_says_so():
    install = load_install()
    commands, notes = install.plan(system="Linux", gpu=False, reachable=False, why="Name or service not known",
                                   python="py")
    assert commands == [["py", "-m", "pip", "install", "-e", "."]]  # exactly what `pip install -e .` did
    assert "cannot be reached (Name or service not known)" in notes[0] and "from PyPI" in notes[0]
    assert "--index-url " + install.CPU_INDEX in notes[1]  # how to switch once it can be reached


def test_gpu_macos_and_windows_use_pypi_alone():
    install = load_install()
    for system, gpu in (("Linux", True), ("Darwin", False), ("Windows", False)):
        commands, _ = install.plan(system=system, gpu=gpu, reachable=True, python="py")
        assert commands == [["py", "-m", "pip", "install", "-e", "."]], system


def test_gpu_detection(tmp_path):
    install = load_install()
    missing = tmp_path / "no-driver"
    assert not install.has_nvidia_gpu(proc=missing, smi="")
    (tmp_path / "version").write_text("NVRM version: 580\n")
    assert install.has_nvidia_gpu(proc=tmp_path / "version", smi="")
    fake_smi = tmp_path / "nvidia-smi"
    fake_smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    fake_smi.chmod(0o755)
    assert install.has_nvidia_gpu(proc=missing, smi=str(fake_smi))
    fake_smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver' >&2\nexit 9\n")
    assert not install.has_nvidia_gpu(proc=missing, smi=str(fake_smi))


def test_index_probe_reports_an_unreachable_index():
    reachable, why = load_install().index_reachable(UNREACHABLE, timeout=5)
    assert not reachable and why


def test_dry_run_without_gpu_and_without_the_index_prints_the_fallback():
    result = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--index-url", UNREACHABLE, "--extras", "test",
                             "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"install: no NVIDIA GPU found, but PyTorch's CPU index {UNREACHABLE} cannot be "
                               "reached")
    assert lines[-1] == f"$ {sys.executable} -m pip install -e .[test]"


def test_bad_extras_is_one_line_and_status_2():
    result = subprocess.run([sys.executable, str(SCRIPT), "--extras", "test;rm", "--dry-run"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "error: --extras:" in result.stderr.splitlines()[-1]


def test_readme_commands_use_the_install_step():
    """Command 1 and 2 of the quick start, as a CPU user copies them, go through scripts/install.py."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert "python scripts/install.py && python mnist.py" in commands[0]
    assert "python scripts/install.py --extras test && python -m pytest -q" in commands[1]
    assert "pip install" not in block  # no bare `pip install -e .`: it takes the CUDA build on a CPU-only Linux
    ci = (REPO / ".ci" / "run").read_text()
    assert "python scripts/install.py --extras test" in ci  # CI runs the README's test command

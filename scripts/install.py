"""Install dpvision into the active Python environment with the PyTorch build this machine can use.

    python scripts/install.py                  # pip install -e .        (what `python mnist.py` needs)
    python scripts/install.py --extras test    # pip install -e ".[test]" (what the tests need)
    python scripts/install.py --dry-run        # print what it would run, run nothing

Why: on Linux, PyPI's torch is the CUDA build, whose nvidia-* and triton packages (3.2 GB and 0.9 GB
installed, measured) a machine without an NVIDIA GPU never uses. So on Linux without an NVIDIA GPU (no
``nvidia-smi`` that lists one, no ``/proc/driver/nvidia``) this script first installs torch and torchvision
from PyTorch's CPU index, at the newest versions ``pyproject.toml`` allows, then runs ``pip install -e .``,
which keeps them (they satisfy its pins). With an NVIDIA GPU, and on macOS and Windows (whose PyPI wheels have
no CUDA libraries), it runs ``pip install -e .`` alone. If the CPU index cannot be reached, it says so and
installs from PyPI (the CUDA build on Linux). ``--cpu`` / ``--gpu`` override the detection. Standard library
only: it runs before anything is installed. Exit status: pip's, or 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NVIDIA_PROC = Path("/proc/driver/nvidia/version")
PROBE_TIMEOUT_S = 10.0


def torch_pins(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """``["torch==X", "torchvision==Y"]``: the upper bounds (``<=``) of ``pyproject.toml``'s dependencies."""
    text = pyproject.read_text(encoding="utf-8")
    pins = []
    for name in ("torch", "torchvision"):
        found = re.search(rf'"{name}[^"]*<=\s*([0-9][^",\s]*)', text)
        if not found:
            raise SystemExit(f"error: {pyproject}: no '{name}...<=VERSION' dependency to pin the CPU build to")
        pins.append(f"{name}=={found.group(1)}")
    return pins


def has_nvidia_gpu(proc: Path = NVIDIA_PROC, smi: str | None = None) -> bool:
    """Whether an NVIDIA GPU with its driver is present: the driver's /proc entry, or ``nvidia-smi -L`` lists one."""
    if proc.exists():
        return True
    smi = smi if smi is not None else shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


def index_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """``(True, "")`` when ``url``'s torch page answers within ``timeout`` seconds, else ``(False, why)``."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/torch/", method="HEAD"),
                                    timeout=timeout):
            return True, ""
    except Exception as err:  # any failure (DNS, refused, TLS, HTTP error, timeout) means: use PyPI
        return False, str(getattr(err, "reason", err)) or type(err).__name__


def plan(*, system: str, gpu: bool, reachable: bool, why: str = "", extras: str = "", index: str = CPU_INDEX,
         python: str = sys.executable, pins: list[str] | None = None) -> tuple[list[list[str]], list[str]]:
    """The pip commands to run, and the lines that say why: the decision alone, nothing is run here."""
    pip = [python, "-m", "pip", "install"]
    target = f".[{extras}]" if extras else "."
    project = [*pip, "-e", target]
    if system != "Linux":
        return [project], [f"{system}: PyPI's PyTorch has no CUDA libraries here; installing from PyPI"]
    if gpu:
        return [project], ["NVIDIA GPU found (or --gpu): installing PyPI's PyTorch (the CUDA build)"]
    pins = pins if pins is not None else torch_pins()
    if not reachable:
        return [project], [
            f"no NVIDIA GPU found, but PyTorch's CPU index {index} cannot be reached ({why}): installing PyTorch "
            "from PyPI instead, the CUDA build (its nvidia-* and triton packages take about 4 GB, unused without "
            "a GPU)",
            f"to switch later: pip install --force-reinstall {' '.join(pins)} --index-url {index}"]
    return [[*pip, *pins, "--index-url", index], project], [
        f"no NVIDIA GPU found: installing the CPU build of PyTorch ({', '.join(pins)}) from {index}, "
        f"then dpvision (pip keeps that PyTorch: it satisfies pyproject.toml)"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python scripts/install.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--extras", default="", help="optional dependencies, comma-separated: test, tensorboard")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cpu", action="store_true", help="install the CPU build of PyTorch (skip GPU detection)")
    which.add_argument("--gpu", action="store_true", help="install PyPI's PyTorch (skip GPU detection)")
    parser.add_argument("--index-url", default=CPU_INDEX, help=f"PyTorch's CPU index (default {CPU_INDEX})")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="pass -q to pip")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"([A-Za-z0-9_-]+(,[A-Za-z0-9_-]+)*)?", args.extras):
        parser.error(f"--extras: comma-separated names such as 'test' or 'test,tensorboard', got {args.extras!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    system = platform.system()
    gpu = args.gpu or (not args.cpu and system == "Linux" and has_nvidia_gpu())
    reachable, why = (True, "")
    if system == "Linux" and not gpu:
        reachable, why = index_reachable(args.index_url)
    commands, notes = plan(system=system, gpu=gpu, reachable=reachable, why=why, extras=args.extras,
                           index=args.index_url)
    for note in notes:
        print(f"install: {note}", flush=True)
    for command in commands:
        if args.quiet:
            command = [*command[:4], "-q", *command[4:]]
        print("$ " + " ".join(command), flush=True)
        if args.dry_run:
            continue
        status = subprocess.call(command, cwd=REPO)
        if status and "--index-url" in command:  # the CPU index answered the probe but pip failed: use PyPI
            print(f"install: pip could not install the CPU build from {args.index_url} (exit {status}); "
                  "installing PyTorch from PyPI instead", flush=True)
        elif status:
            return status
    if not args.dry_run:
        report_build(sys.executable)
    return 0


def report_build(python: str) -> None:
    """Say which PyTorch build ended up installed (CPU or CUDA): what the user will actually run."""
    probe = "import torch; print(torch.__version__, torch.version.cuda or 'none')"
    got = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    if got.returncode == 0 and len(got.stdout.split()) == 2:
        version, cuda = got.stdout.split()
        build = "the CPU build" if cuda == "none" else f"a CUDA {cuda} build"
        print(f"install: done: PyTorch {version}, {build}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

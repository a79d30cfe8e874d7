"""Shared fixtures for the CelebA tests: small generated archives, built once per session.

Import the fixtures into a test module (``from tests.celeba_fixtures import demo_archive, ...``).
Archives are cached per (n, seed, format, nested), so modules sharing a fixture
do not regenerate them; tests that modify an archive take a private copy.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpvision.celeba.demo import make_demo_archive

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
DEMO_N = 400  # 320 train / 40 val / 40 test: ~64/8/8 images with eyeglasses
DEMO_SEED = 0
_CACHE: dict[tuple, Path] = {}


def cached_archive(factory, n: int = DEMO_N, seed: int = DEMO_SEED, fmt: str = "csv", nested: bool = True) -> Path:
    key = (n, seed, fmt, nested)
    if key not in _CACHE:
        out = factory.mktemp("celeba_archive") / f"archive_{n}_{seed}_{fmt}_{int(nested)}"
        make_demo_archive(out, n, seed, fmt=fmt, nested=nested, workers=1)
        _CACHE[key] = out
    return _CACHE[key]


@pytest.fixture(scope="session")
def demo_archive(tmp_path_factory) -> Path:
    """A read-only 400-image Kaggle-layout archive (CSV tables, nested image folder)."""
    return cached_archive(tmp_path_factory)


@pytest.fixture
def archive_copy(demo_archive, tmp_path) -> Path:
    """A private, writable copy of ``demo_archive`` for tests that break it."""
    return Path(shutil.copytree(demo_archive, tmp_path / "archive"))


@pytest.fixture
def txt_archive_copy(tmp_path_factory, tmp_path) -> Path:
    """A private, writable copy of the original-release (``.txt``, flat image folder) demo archive."""
    return Path(shutil.copytree(cached_archive(tmp_path_factory, fmt="txt", nested=False), tmp_path / "archive_txt"))


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes: proves a folder was not modified."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``scripts/<name>`` with this interpreter, capturing text output.

    A run that outlives ``timeout`` (e.g. one hanging on a FIFO) raises ``subprocess.TimeoutExpired``.
    """
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def start_celeba_cli(*args: str) -> subprocess.Popen:
    """Start ``python -m dpvision.celeba.cli <args>`` in the background, stderr captured as text."""
    return subprocess.Popen([sys.executable, "-m", "dpvision.celeba.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_staging(parent: Path, name: str, proc: subprocess.Popen, limit_s: float = 120) -> Path:
    """The ``.<name>.tmp-*`` folder a running command stages its output in, once it holds a JPEG.

    Polls (no timing is asserted); fails if the command ends first or ``limit_s`` passes.
    """
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the command ended early: {proc.stderr.read()}"
        for folder in parent.glob(f".{name}.tmp-*"):
            if next(folder.rglob("*.jpg"), None) is not None:
                return folder
        time.sleep(0.05)
    raise AssertionError(f"no staging folder .{name}.tmp-* with images appeared in {parent}")

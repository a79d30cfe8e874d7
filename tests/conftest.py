"""Shared MNIST fixtures: the real MNIST when it is on disk (else a skip that says where to put it), and a tiny
synthetic MNIST written by the tests themselves.

* ``mnist_root``: a temporary data root whose ``MNIST/raw/`` links the real IDX files. They are looked up in
  ``$DPVISION_MNIST_SOURCE`` when set (a folder with the four files; CI sets it), else in the data root the
  README names, ``<repo>/data/MNIST/raw/``; gzipped or not. Neither there: every test using it is skipped
  with :data:`REAL_MNIST_SKIP`. A variable that is set but names no complete copy fails instead (a typo must
  not turn into silently skipped tests).
* ``tiny_mnist_root``: a data root with a tiny but valid MNIST (:data:`TINY_MNIST_TRAIN` train and
  :data:`TINY_MNIST_TEST` test images, 10 classes, written by :func:`tests.data_fixtures.write_idx_mnist`) in
  torchvision's exact layout ``<root>/MNIST/raw/*-ubyte.gz``. For tests that need images but not real digits
  (bad input, resume refusals, checkpoint mechanics, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.data_fixtures import write_idx_mnist

if not torch.cuda.is_available():
    # Without CUDA, Triton kernels can only run in Triton's CPU interpreter (tests/test_fused.py), which must
    # be chosen before Triton's first import. The engines never run Triton on the CPU by themselves.
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
MNIST_SOURCE_ENV = "DPVISION_MNIST_SOURCE"
README_MNIST_DIR = REPO_ROOT / "data" / "MNIST" / "raw"  # the README's data root, data/MNIST/raw/
REAL_MNIST_SKIP = ("real MNIST not found: put the four IDX files in data/MNIST/raw/ "
                   "or set DPVISION_MNIST_SOURCE")
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TINY_MNIST_TRAIN = 600  # enough for the tests' --k 600 and k=300 runs
TINY_MNIST_TEST = 200


def idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files of ``folder`` (each unpacked or ``.gz``; unpacked preferred), or None if one is missing."""
    found = {}
    for name in RAW_FILES:
        path = next((folder / f"{name}{ext}" for ext in ("", ".gz") if (folder / f"{name}{ext}").is_file()), None)
        if path is None:
            return None
        found[name] = path
    return found


def real_mnist_files() -> dict[str, Path] | None:
    """The real MNIST's four files from ``$DPVISION_MNIST_SOURCE`` or ``<repo>/data/MNIST/raw``; None if neither."""
    source = os.environ.get(MNIST_SOURCE_ENV)
    if source:
        files = idx_files(Path(source))
        if files is None:
            pytest.fail(f"{MNIST_SOURCE_ENV}={source} does not hold the four MNIST IDX files "
                        f"({', '.join(RAW_FILES)}, gzipped or not); fix or unset it", pytrace=False)
        return files
    return idx_files(README_MNIST_DIR)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root whose ``MNIST/raw/`` links the real MNIST (read only, nothing downloaded); skipped without it."""
    files = real_mnist_files()
    if files is None:
        pytest.skip(REAL_MNIST_SKIP)
    root = tmp_path_factory.mktemp("mnist_data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in files.values():  # links: the 55 MB are never copied, and the loader writes nothing there
        (raw / path.name).symlink_to(path.resolve())
    return root


@pytest.fixture(scope="session")
def tiny_mnist_root(tmp_path_factory) -> Path:
    """A data root holding a tiny synthetic MNIST (600 train / 200 test images), gzipped IDX files."""
    root = tmp_path_factory.mktemp("tiny_mnist")
    write_idx_mnist(root, TINY_MNIST_TRAIN, TINY_MNIST_TEST)
    return root

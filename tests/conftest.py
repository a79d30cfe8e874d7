"""Shared fixtures: the real MNIST from the shared folder, copied into a temporary data root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI and developers keep the offline MNIST copy beside the checkout (../shared/data/mnist).
MNIST_SOURCE = Path(os.environ.get("DPVISION_MNIST_SOURCE", REPO_ROOT.parent / "shared" / "data" / "mnist"))


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory) -> Path:
    """A data root with the real MNIST IDX files under ``MNIST/raw`` (nothing is downloaded)."""
    from dpvision.data.mnist import link_shared_copy

    if not MNIST_SOURCE.is_dir():
        pytest.fail(f"offline MNIST not found at {MNIST_SOURCE}; set DPVISION_MNIST_SOURCE to a folder with the four .gz files")
    root = tmp_path_factory.mktemp("data")
    link_shared_copy(MNIST_SOURCE, root)
    return root

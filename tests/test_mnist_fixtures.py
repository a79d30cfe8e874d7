"""The shared MNIST fixtures of conftest: where the real MNIST is looked for, and the tiny synthetic one."""

from __future__ import annotations

import gzip

import pytest
import torch

import tests.conftest as fixtures
from dpvision.data.mnist import load_mnist
from tests.data_fixtures import write_idx_mnist


def tiny_raw(root):
    """A tiny MNIST's ``MNIST/raw`` folder under ``root`` (four .gz files)."""
    return write_idx_mnist(root, 60, 20)


def test_tiny_mnist_is_valid_torchvision_layout(tiny_mnist_root):
    raw = tiny_mnist_root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{name}.gz" for name in fixtures.RAW_FILES)
    header = gzip.decompress((raw / "train-images-idx3-ubyte.gz").read_bytes())[:16]
    assert header == bytes.fromhex("00000803 00000258 0000001c 0000001c")  # magic 2051, 600 x 28 x 28
    train = load_mnist(tiny_mnist_root, train=True, download=False)
    test = load_mnist(tiny_mnist_root, train=False, download=False)
    assert train.images.shape == (fixtures.TINY_MNIST_TRAIN, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (fixtures.TINY_MNIST_TEST, 1, 28, 28)
    for split in (train, test):
        assert torch.bincount(split.labels, minlength=10).min() > 0  # all 10 classes


def test_real_mnist_from_the_variable_gz_or_not(tmp_path, monkeypatch):
    source = tiny_raw(tmp_path)
    unpacked = source / "t10k-labels-idx1-ubyte"
    unpacked.write_bytes(gzip.decompress((source / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    monkeypatch.setenv(fixtures.MNIST_SOURCE_ENV, str(source))
    files = fixtures.real_mnist_files()
    assert files["t10k-labels-idx1-ubyte"] == unpacked  # unpacked preferred
    assert files["train-images-idx3-ubyte"] == source / "train-images-idx3-ubyte.gz"


def test_readme_data_root_is_the_default(tmp_path, monkeypatch):
    monkeypatch.delenv(fixtures.MNIST_SOURCE_ENV, raising=False)
    monkeypatch.setattr(fixtures, "README_MNIST_DIR", tmp_path / "data" / "MNIST" / "raw")
    assert fixtures.real_mnist_files() is None  # nothing there: mnist_root skips with REAL_MNIST_SKIP
    tiny_raw(tmp_path / "data")
    assert set(fixtures.real_mnist_files()) == set(fixtures.RAW_FILES)


def test_a_variable_naming_no_copy_fails_instead_of_skipping(tmp_path, monkeypatch):
    source = tiny_raw(tmp_path)
    (source / "t10k-images-idx3-ubyte.gz").unlink()
    monkeypatch.setenv(fixtures.MNIST_SOURCE_ENV, str(source))
    with pytest.raises(pytest.fail.Exception, match="DPVISION_MNIST_SOURCE=.* does not hold the four MNIST"):
        fixtures.real_mnist_files()

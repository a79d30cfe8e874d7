"""MNIST as uint8 tensors, found on disk or downloaded through torchvision.

Data lives in torchvision's layout: ``<data-root>/MNIST/raw/`` holds the four
IDX files (gzipped or not). Nothing is downloaded when they are already there.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch

from dpvision.data.tensors import ImageTensors
from dpvision.runs import atomic_write_bytes

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
MNIST_TRAIN_SIZE = 60_000
MNIST_TEST_SIZE = 10_000
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class DataNotFoundError(FileNotFoundError):
    """The data is not on disk and could not be downloaded."""


def raw_dir(data_root: str | Path) -> Path:
    return Path(data_root) / "MNIST" / "raw"


def _missing_raw_files(data_root: str | Path) -> list[str]:
    """Decompress any ``.gz`` that lacks its IDX file; return the names still missing."""
    folder = raw_dir(data_root)
    missing = []
    for name in RAW_FILES:
        target, packed = folder / name, folder / f"{name}.gz"
        if not target.exists() and packed.exists():
            with gzip.open(packed, "rb") as handle:
                atomic_write_bytes(target, handle.read())
        if not target.exists():
            missing.append(name)
    return missing


def ensure_mnist(data_root: str | Path, *, download: bool = True) -> Path:
    """Make sure the four IDX files are under ``<data_root>/MNIST/raw``; return that folder."""
    if not _missing_raw_files(data_root):
        return raw_dir(data_root)
    if download:
        try:
            _download(data_root)
        except Exception as err:  # offline: URLError, RuntimeError, ...
            reason = f"download failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        else:
            reason = ""
    else:
        reason = "download disabled"
    missing = _missing_raw_files(data_root)
    if missing:
        raise DataNotFoundError(
            f"MNIST not found under {raw_dir(data_root)} ({reason}); put the four IDX files "
            f"{', '.join(f + '.gz' for f in RAW_FILES)} (gzipped or not) in {raw_dir(data_root)}/, "
            "or pass --data-root pointing at a folder that has MNIST/raw/"
        )
    return raw_dir(data_root)


def _download(data_root: str | Path) -> None:
    from torchvision.datasets import MNIST

    MNIST(str(data_root), train=True, download=True)


def load_mnist(data_root: str | Path, *, train: bool, download: bool = True) -> ImageTensors:
    """MNIST's train (60,000) or test (10,000) split: images uint8 [N, 1, 28, 28], labels int64 [N]."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder = ensure_mnist(data_root, download=download)
    prefix = "train" if train else "t10k"
    images = read_image_file(str(folder / f"{prefix}-images-idx3-ubyte"))  # [N, 28, 28] uint8
    labels = read_label_file(str(folder / f"{prefix}-labels-idx1-ubyte")).long()  # [N]
    return ImageTensors(images.unsqueeze(1).contiguous(), labels, MNIST_MEAN, MNIST_STD)


def random_subset(data: ImageTensors, k: int, generator: torch.Generator) -> ImageTensors:
    """A uniformly random subset of ``k`` examples (without replacement), in a seeded order."""
    if not 1 <= k <= len(data):
        raise ValueError(f"--k must be between 1 and {len(data)}, got {k}")
    indices = torch.randperm(len(data), generator=generator)[:k]
    return data.subset(indices)


def link_shared_copy(source: str | Path, data_root: str | Path) -> Path:
    """Copy the gzipped IDX files of a local MNIST folder into ``<data_root>/MNIST/raw`` (tests, CI)."""
    folder = raw_dir(data_root)
    folder.mkdir(parents=True, exist_ok=True)
    for name in RAW_FILES:
        src = Path(source) / f"{name}.gz"
        if not (folder / f"{name}.gz").exists() and not (folder / name).exists():
            shutil.copyfile(src, folder / f"{name}.gz")
    return folder

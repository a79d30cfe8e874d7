"""MNIST and Fashion-MNIST as uint8 tensors, found on disk or downloaded through torchvision.

Data lives in torchvision's layout: ``<data-root>/MNIST/raw/`` (Fashion-MNIST:
``<data-root>/FashionMNIST/raw/``) holds the four IDX files, gzipped or not
(an unpacked file is preferred when both are there). ``.gz`` files are read
directly, never unpacked, so a read-only folder works. Nothing is downloaded
when the files are already there; every corrupt file is a one-line
:class:`~dpvision.data.files.DataError` naming it (see :mod:`dpvision.data.idx`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dpvision.data.files import DataError, DataNotFoundError, find_file
from dpvision.data.idx import read_idx_images, read_idx_labels
from dpvision.data.tensors import ImageTensors

__all__ = [
    "MNIST_MEAN", "MNIST_STD", "MNIST_TRAIN_SIZE", "MNIST_TEST_SIZE", "RAW_FILES", "DataNotFoundError", "IdxSpec",
    "MNIST", "FASHION_MNIST", "raw_dir", "ensure_mnist", "ensure_idx", "load_mnist", "load_idx_split",
    "random_subset",
]

# Published constants (computed once, by others, from the public train sets), never from the data a run is
# given: statistics of a private training set would escape ε (docs/privacy.md, "Normalisation").
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
MNIST_TRAIN_SIZE = 60_000
MNIST_TEST_SIZE = 10_000
RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IMAGE_SIDE = 28
NUM_CLASSES = 10


@dataclass(frozen=True)
class IdxSpec:
    """One IDX dataset: its folder under the data root, statistics and class names."""

    name: str  # --dataset value
    folder: str  # torchvision's class name, the folder under <data-root>
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]


MNIST = IdxSpec("mnist", "MNIST", MNIST_MEAN, MNIST_STD, tuple(str(d) for d in range(10)))
FASHION_MNIST = IdxSpec("fashion-mnist", "FashionMNIST", FASHION_MNIST_MEAN, FASHION_MNIST_STD, (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"))


def raw_dir(data_root: str | Path, spec: IdxSpec = MNIST) -> Path:
    return Path(data_root) / spec.folder / "raw"


def _raw_path(data_root: str | Path, spec: IdxSpec, name: str) -> Path | None:
    """The IDX file ``name`` (unpacked preferred, else ``.gz``), or None when neither exists."""
    return find_file(raw_dir(data_root, spec), name, ("", ".gz"))


def _missing_raw_files(data_root: str | Path, spec: IdxSpec = MNIST) -> list[str]:
    """The names of the four IDX files present neither unpacked nor as ``.gz``; writes nothing."""
    return [name for name in RAW_FILES if _raw_path(data_root, spec, name) is None]


def _download(data_root: str | Path) -> None:
    from torchvision.datasets import MNIST as TorchMNIST

    TorchMNIST(str(data_root), train=True, download=True)


def _download_fashion_mnist(data_root: str | Path) -> None:
    from torchvision.datasets import FashionMNIST

    FashionMNIST(str(data_root), train=True, download=True)


def _downloader(spec: IdxSpec):
    # Looked up when called, so tests can replace either function.
    return _download if spec.name == "mnist" else _download_fashion_mnist


def ensure_idx(data_root: str | Path, spec: IdxSpec, *, download: bool = True) -> Path:
    """Make sure the four IDX files are under ``<data_root>/<spec.folder>/raw``; return that folder."""
    if not _missing_raw_files(data_root, spec):
        return raw_dir(data_root, spec)
    folder = raw_dir(data_root, spec)
    created = [d for d in (folder, folder.parent, Path(data_root)) if not d.exists()]  # deepest first
    if download:
        try:
            _downloader(spec)(data_root)
        except Exception as err:  # offline: URLError, RuntimeError, PermissionError, ...
            reason = f"download failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        else:
            reason = ""
    else:
        reason = "download disabled"
    missing = _missing_raw_files(data_root, spec)
    if missing:
        for d in created:  # a failed download leaves no empty folders behind (never one that held anything)
            try:
                d.rmdir()
            except OSError:
                break
        raise DataNotFoundError(
            f"{spec.folder} not found under {folder} ({reason or 'missing after download'}); put the four IDX "
            f"files {', '.join(f + '.gz' for f in RAW_FILES)} (gzipped or not) in {folder}/, "
            f"or pass --data-root pointing at a folder that has {spec.folder}/raw/"
        )
    return raw_dir(data_root, spec)


def ensure_mnist(data_root: str | Path, *, download: bool = True) -> Path:
    """Make sure the four IDX files are under ``<data_root>/MNIST/raw``; return that folder."""
    return ensure_idx(data_root, MNIST, download=download)


def load_idx_split(data_root: str | Path, spec: IdxSpec, *, train: bool, download: bool = True) -> ImageTensors:
    """The train or test split of an IDX dataset: images uint8 [N, 1, 28, 28], labels int64 [N]."""
    ensure_idx(data_root, spec, download=download)
    prefix = "train" if train else "t10k"
    image_path = _raw_path(data_root, spec, f"{prefix}-images-idx3-ubyte")
    label_path = _raw_path(data_root, spec, f"{prefix}-labels-idx1-ubyte")
    images = read_idx_images(image_path, IMAGE_SIDE, IMAGE_SIDE)  # [N, 28, 28] uint8
    labels = read_idx_labels(label_path, NUM_CLASSES)  # [N] int64
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels; "
                        "the two files of a split must have the same count")
    return ImageTensors(images.unsqueeze(1).contiguous(), labels, spec.mean, spec.std)


def load_mnist(data_root: str | Path, *, train: bool, download: bool = True) -> ImageTensors:
    """MNIST's train (60,000) or test (10,000) split: images uint8 [N, 1, 28, 28], labels int64 [N]."""
    return load_idx_split(data_root, MNIST, train=train, download=download)


def random_subset(data: ImageTensors, k: int, generator: torch.Generator) -> ImageTensors:
    """A uniformly random subset of ``k`` examples (without replacement), in a seeded order."""
    if not 1 <= k <= len(data):
        raise ValueError(f"--k must be between 1 and {len(data)}, got {k}")
    indices = torch.randperm(len(data), generator=generator)[:k]
    return data.subset(indices)

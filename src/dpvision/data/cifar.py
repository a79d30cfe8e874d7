"""CIFAR-10 from its python pickle batches, found on disk or downloaded through torchvision.

Layout (what ``torchvision.datasets.CIFAR10(download=True)`` unpacks)::

    <data-root>/cifar-10-batches-py/
        data_batch_1 .. data_batch_5    train: {b"data": uint8 [n, 3072], b"labels": [n ints], ...}
        test_batch                      test, same format
        batches.meta                    {b"label_names": [10 names], ...}

A row of ``data`` is the 32x32 red plane, then green, then blue, each row-major,
so it reshapes straight to [3, 32, 32]. The batches are Python 2 pickles; keys
are bytes or str depending on who wrote them, and both are accepted.

Unpickling can run arbitrary code, so the batches go through an unpickler that
only knows the few numpy constructors an array needs; anything else in the
file is refused as corrupt. Every file is size-bounded before it is read.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from dpvision.data.files import DataError, DataNotFoundError, check_total_bytes, read_regular, regular_file_stat
from dpvision.data.tensors import ImageTensors

# Published constants, never computed from the data a run is given (docs/privacy.md, "Normalisation").
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)
ROW_BYTES = 3 * 32 * 32
MAX_BATCH_FILE_BYTES = 1 << 30  # a real batch is 31 MB; 1 GiB leaves room for larger home-made ones
MAX_META_FILE_BYTES = 1 << 20  # batches.meta is 158 bytes


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What a protocol-2 pickle written by Python 3 calls to rebuild ``bytes``; only latin1 is allowed."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler for plain containers and numpy arrays; any other global is refused."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR batch holds only arrays and lists)")


def _unpickle(path: Path, max_bytes: int) -> dict[str, object]:
    """The batch's dict with str keys (bytes keys decoded as latin1)."""
    raw = read_regular(path, max_bytes)
    if not raw:
        raise DataError(f"{path} is empty; expected a CIFAR python pickle batch")
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as err:  # UnpicklingError, EOFError, ValueError, TypeError, ... from a corrupt file
        raise DataError(f"{path}: not a readable CIFAR pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _names(value: object, path: Path) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{path}: label_names must be a non-empty list of names")
    names = tuple(v.decode("latin1") if isinstance(v, bytes) else v for v in value)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise DataError(f"{path}: label_names must be distinct non-empty strings, got {list(names)[:12]}")
    return names


def read_meta(path: Path) -> tuple[str, ...]:
    """The class names of ``batches.meta``."""
    meta = _unpickle(path, MAX_META_FILE_BYTES)
    if "label_names" not in meta:
        raise DataError(f"{path}: no 'label_names' entry (keys: {sorted(map(str, meta))[:8]})")
    return _names(meta["label_names"], path)


def read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, 3, 32, 32], labels int64 [n])`` of one batch file."""
    batch = _unpickle(path, MAX_BATCH_FILE_BYTES)
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataError(f"{path}: no {' or '.join(repr(k) for k in missing)} entry; not a CIFAR-10 batch")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array [n, {ROW_BYTES}], got {got}")
    try:
        labels = np.asarray(labels)
    except Exception:
        labels = np.array([None])
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"{path}: 'labels' must be {data.shape[0]} integers (one per row of 'data'), "
                        f"got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(f"{path}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of range "
                        f"(0..{num_classes - 1}, from batches.meta)")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def cifar_dir(data_root: str | Path) -> Path:
    return Path(data_root) / CIFAR10_FOLDER


def _missing(data_root: str | Path) -> list[str]:
    folder = cifar_dir(data_root)
    return [name for name in (*TRAIN_BATCHES, TEST_BATCH, META_FILE) if not os.path.lexists(folder / name)]


def _download_cifar10(data_root: str | Path) -> None:
    from torchvision.datasets import CIFAR10

    CIFAR10(str(data_root), train=True, download=True)


def ensure_cifar10(data_root: str | Path, *, download: bool = True) -> Path:
    """Make sure the seven batch files are under ``<data_root>/cifar-10-batches-py``; return that folder."""
    if not _missing(data_root):
        return cifar_dir(data_root)
    reason = "download disabled"
    if download:
        try:
            _download_cifar10(data_root)
            reason = "missing after download"
        except Exception as err:  # offline: URLError, RuntimeError, PermissionError, ...
            reason = f"download failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    missing = _missing(data_root)
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 not found under {cifar_dir(data_root)} ({reason}; missing {', '.join(missing)}); unpack "
            f"cifar-10-python.tar.gz so that {cifar_dir(data_root)}/ holds {', '.join(TRAIN_BATCHES)}, "
            f"{TEST_BATCH} and {META_FILE}, or pass --data-root pointing at the folder that has {CIFAR10_FOLDER}/")
    return cifar_dir(data_root)


def _split(paths: list[Path], num_classes: int) -> ImageTensors:
    size = sum(regular_file_stat(p).st_size for p in paths)
    check_total_bytes(size, f"CIFAR-10 batches {', '.join(p.name for p in paths)}", "these are not CIFAR-10 batches")
    parts = [read_batch(p, num_classes) for p in paths]
    images = np.concatenate([p[0] for p in parts])  # [N, 3, 32, 32]
    if len(images) == 0:
        raise DataError(f"{', '.join(str(p) for p in paths)} hold no images")
    labels = np.concatenate([p[1] for p in parts])
    return ImageTensors(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10_MEAN, CIFAR10_STD)


def load_cifar10(data_root: str | Path, *, download: bool = True) -> tuple[ImageTensors, ImageTensors, tuple[str, ...]]:
    """``(train [50000, 3, 32, 32], test [10000, 3, 32, 32], class_names)`` of CIFAR-10."""
    folder = ensure_cifar10(data_root, download=download)
    names = read_meta(folder / META_FILE)
    train = _split([folder / name for name in TRAIN_BATCHES], len(names))
    test = _split([folder / TEST_BATCH], len(names))
    return train, test, names

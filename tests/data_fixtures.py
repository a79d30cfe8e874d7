"""Writers of tiny datasets in each dataset's exact on-disk format, for any test that needs data.

Plain functions (no pytest fixtures), deterministic for a given seed::

    write_idx_mnist(root, 60, 20)               -> <root>/MNIST/raw/*-ubyte.gz
    write_idx_mnist(root, 60, 20, folder="FashionMNIST", gz=False)
    write_cifar10(root, 50, 10)                 -> <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}
    write_imagefolder(root, ("cat", "dog"), 4, 12)  -> <root>/{train,val,test}/<class>/<i>.jpg
    write_celeba_folder(root, 40, 8, 8)         -> <root>/{train,val,test}.pt, stats.json

Images carry a class signal (class ``c`` is brighter by ``c * 20``) so a model can learn them.
Then e.g. ``dpvision.data.load_dataset("cifar10", root, download=False)``.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from dpvision.data.files import DataError

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CELEBA_CLASSES = ("no_eyeglasses", "eyeglasses")
CELEBA_STRATA = ("iod0", "iod1", "iod2")


def _images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 [n, *shape]: noise plus 20 * label, so classes differ on average."""
    noise = rng.integers(0, 56, size=(len(labels), *shape))
    return (noise + 20 * labels.reshape(-1, *([1] * len(shape)))).clip(0, 255).astype(np.uint8)


def idx_bytes(magic: int, dims: Sequence[int], payload: bytes) -> bytes:
    """An IDX file: big-endian magic, one uint32 per dimension, then the payload."""
    return struct.pack(f">I{len(dims)}I", magic, *dims) + payload


def write_bytes(path: Path, data: bytes, gz: bool) -> Path:
    """Write ``data`` to ``path`` (``path + ".gz"``, gzipped, when ``gz``); return the path written."""
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def write_idx_mnist(root: str | Path, n_train: int, n_test: int, folder: str = "MNIST", gz: bool = True,
                    seed: int = 0, num_classes: int = 10) -> Path:
    """The four IDX files of MNIST (``folder="FashionMNIST"``: Fashion-MNIST) under ``<root>/<folder>/raw``."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / folder / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, num_classes, size=n).astype(np.uint8)
        images = _images(rng, labels, (28, 28))
        write_bytes(raw / f"{prefix}-images-idx3-ubyte", idx_bytes(IDX_IMAGES_MAGIC, (n, 28, 28), images.tobytes()), gz)
        write_bytes(raw / f"{prefix}-labels-idx1-ubyte", idx_bytes(IDX_LABELS_MAGIC, (n,), labels.tobytes()), gz)
    return raw


def cifar_batch_bytes(images: np.ndarray, labels: Sequence[int], batch_label: str = "batch") -> bytes:
    """A CIFAR python batch: protocol-2 pickle of {b"batch_label", b"labels", b"data" uint8 [n, 3072], b"filenames"}."""
    batch = {
        b"batch_label": batch_label.encode(),
        b"labels": [int(y) for y in labels],
        b"data": np.ascontiguousarray(images, dtype=np.uint8).reshape(len(labels), 3072),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=2)


def write_cifar10(root: str | Path, n_train: int, n_test: int, seed: int = 0,
                  label_names: Sequence[str] = CIFAR10_CLASSES) -> Path:
    """``<root>/cifar-10-batches-py/``: ``n_train`` images shared over data_batch_1..5, ``n_test`` in test_batch."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, n_train, 6).astype(int)
    for i in range(5):
        labels = rng.integers(0, len(label_names), size=int(bounds[i + 1] - bounds[i]))
        data = _images(rng, labels, (3, 32, 32))
        (folder / f"data_batch_{i + 1}").write_bytes(cifar_batch_bytes(data, labels, f"training batch {i + 1} of 5"))
    labels = rng.integers(0, len(label_names), size=n_test)
    (folder / "test_batch").write_bytes(cifar_batch_bytes(_images(rng, labels, (3, 32, 32)), labels, "testing batch 1"))
    meta = {b"num_cases_per_batch": max(1, n_train // 5), b"label_names": [n.encode() for n in label_names],
            b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_imagefolder(root: str | Path, classes: Sequence[str], per_class: int, size: int,
                      splits: Sequence[str] = ("train", "val", "test"), seed: int = 0, ext: str = "jpg",
                      mode: str = "RGB") -> Path:
    """``<root>/<split>/<class>/<i>.<ext>``: ``per_class`` images of ``size`` x (``size`` + 4) pixels each."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in splits:
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = _images(rng, np.array([label]), (size + 4, size, 3))[0]  # H x W x 3, portrait
                img = Image.fromarray(pixels, "RGB")
                (img.convert(mode) if mode != "RGB" else img).save(folder / f"{i:04d}.{ext}")
    return root


def celeba_payload(n: int, size: int, rng: np.random.Generator, class_names=CELEBA_CLASSES) -> dict:
    """One split in celeba_preprocess.py's format."""
    labels = rng.integers(0, len(class_names), size=n)
    return {
        "images": torch.from_numpy(_images(rng, labels, (3, size, size))),
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "strata": [CELEBA_STRATA[i % len(CELEBA_STRATA)] for i in range(n)],
        "image_ids": [f"{i:06d}.jpg" for i in range(n)],
        "class_names": list(class_names),
    }


def write_celeba_folder(root: str | Path, n_train: int, n_val: int, n_test: int, size: int = 16,
                        seed: int = 0) -> Path:
    """A preprocessed CelebA folder (train.pt, val.pt, test.pt, stats.json) as celeba_preprocess.py writes it."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    payloads = {s: celeba_payload(n, size, rng) for s, n in (("train", n_train), ("val", n_val), ("test", n_test))}
    for split, payload in payloads.items():
        torch.save(payload, root / f"{split}.pt")
    train = payloads["train"]["images"].double().div(255)
    stats = {"mean": train.mean(dim=(0, 2, 3)).tolist(), "std": train.std(dim=(0, 2, 3), unbiased=False).tolist(),
             "scale": "0..1", "computed_on": "train", "size": size, "crop": 178, "resample": "PIL LANCZOS",
             "class_names": list(CELEBA_CLASSES), "counts": {s: len(p["labels"]) for s, p in payloads.items()},
             "subset_dir": "synthetic", "subset_index_sha256": "0" * 64}
    (root / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return root


def raises_data_error(call, *needles: object) -> DataError:
    """Run ``call``; it must raise a one-line DataError mentioning every needle (file paths, flags)."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert str(needle) in message, message
    return info.value

"""One entry point for every dataset: ``load_dataset(name, root)`` -> train/val/test uint8 tensors.

``root`` is ``--data-root``; what it must hold depends on the dataset
(:func:`dataset_root_hint`). MNIST, Fashion-MNIST and CIFAR-10 are downloaded
through torchvision when missing (unless ``download=False``); offline, the
``DataError`` says which files go where. ``image_size`` is bounded by
:data:`MAX_IMAGE_SIZE` (512: 0.75 MiB per uint8 RGB image, and per-example
gradients at larger sizes do not fit DP-SGD batches anyway); a whole dataset's
tensors are bounded by half of physical memory (``$DPVISION_MAX_DATA_BYTES``).

Example:
    >>> splits = load_dataset("mnist", "data")                         # doctest: +SKIP
    >>> splits.train.images.shape, splits.class_names[:3]              # doctest: +SKIP
    (torch.Size([60000, 1, 28, 28]), ('0', '1', '2'))
    >>> dataset_root_hint("cifar10")
    '<data-root>/cifar-10-batches-py/ holding data_batch_1..5, test_batch, batches.meta (CIFAR-10 python version)'
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dpvision.data.celeba_folder import load_celeba_folder
from dpvision.data.cifar import load_cifar10
from dpvision.data.files import DataError
from dpvision.data.imagefolder import DEFAULT_IMAGE_SIZE, MAX_IMAGE_SIZE, check_image_size, load_imagefolder
from dpvision.data.mnist import FASHION_MNIST, MNIST, RAW_FILES, load_idx_split
from dpvision.data.synthetic import load_synthetic
from dpvision.data.tensors import ImageTensors

__all__ = ["DATASETS", "DATASET_REGISTRY", "DEFAULT_IMAGE_SIZE", "MAX_IMAGE_SIZE", "DataError", "Dataset",
           "DatasetSplits", "data_fingerprint", "dataset_root_hint", "load_dataset", "register_dataset"]


@dataclass(frozen=True)
class Dataset:
    """One registered dataset: how to load it and what the rest of the code asks about it."""

    name: str
    load: Callable[[Path, "int | None", bool], "DatasetSplits"]  # (root, image_size, download) -> splits
    root_hint: str  # where --data-root must point, in words (error messages, docs)
    allows_flip: bool  # a mirrored image keeps its label (augmentation may flip it): not for digits


DATASET_REGISTRY: dict[str, Dataset] = {}


def register_dataset(name: str, *, root_hint: str, allows_flip: bool) -> Callable:
    """Decorator: register ``load(root, image_size, download) -> DatasetSplits`` as dataset ``name``."""

    def register(load: Callable) -> Callable:
        if name in DATASET_REGISTRY:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASET_REGISTRY[name] = Dataset(name, load, root_hint, allows_flip)
        return load

    return register


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's splits, all normalised with the dataset's fixed mean/std (never statistics of the data).

Groups are one label per example (or None)."""

    name: str
    train: ImageTensors
    val: ImageTensors | None  # only where the dataset ships one (celeba, imagefolder with val/)
    test: ImageTensors
    class_names: tuple[str, ...]
    test_groups: tuple[str, ...] | None  # celeba: the interocular stratum of each test image
    val_groups: tuple[str, ...] | None

    def __post_init__(self) -> None:
        parts = {"train": self.train, "val": self.val, "test": self.test}
        shape = tuple(self.train.images.shape[1:])
        for split, part in parts.items():
            if part is None:
                continue
            if tuple(part.images.shape[1:]) != shape or (part.mean, part.std) != (self.train.mean, self.train.std):
                raise ValueError(f"{self.name}: {split} images {tuple(part.images.shape[1:])} must match train's "
                                 f"{shape}, with the dataset's fixed mean/std")
            if len(part) and int(part.labels.max()) >= len(self.class_names):
                raise ValueError(f"{self.name}: {split} has label {int(part.labels.max())} but only "
                                 f"{len(self.class_names)} class names")
        for split, groups in (("test", self.test_groups), ("val", self.val_groups)):
            part = parts[split]
            if groups is not None and (part is None or len(groups) != len(part)):
                raise ValueError(f"{self.name}: {split}_groups needs one group per {split} example")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every split."""
        return tuple(self.train.images.shape[1:])


def dataset_root_hint(name: str) -> str:
    """Where ``--data-root`` must point for ``name``, in words (error messages, docs)."""
    return _dataset(name).root_hint


def _dataset(name: str) -> Dataset:
    if name not in DATASET_REGISTRY:
        raise DataError(f"--dataset must be one of {', '.join(DATASET_REGISTRY)}, got {name!r}")
    return DATASET_REGISTRY[name]


def _fixed_size(name: str, image_size: int | None, native: int, fix: str) -> None:
    if image_size is not None and image_size != native:
        raise DataError(f"--image-size {image_size}: {name} images are {native}x{native} and are not resized; "
                        f"{fix}")


def load_dataset(name: str, root: str | Path, *, image_size: int | None = None, download: bool = True
                 ) -> DatasetSplits:
    """Load dataset ``name`` from ``root`` (``--data-root``) as uint8 tensors; ``DataError`` on any bad input.

    ``image_size`` (1..MAX_IMAGE_SIZE) resizes imagefolder images (default
    ``DEFAULT_IMAGE_SIZE``); for the other datasets it may only restate their size.
    """
    dataset = _dataset(name)
    if image_size is not None:
        check_image_size(image_size)
    return dataset.load(Path(root), image_size, download)


def _register_idx(name: str, spec, folder: str, *, allows_flip: bool) -> None:
    hint = f"<data-root>/{folder}/raw/ holding {', '.join(RAW_FILES)} (each gzipped .gz or not)"

    @register_dataset(name, root_hint=hint, allows_flip=allows_flip)
    def load(root: Path, image_size: int | None, download: bool) -> DatasetSplits:
        _fixed_size(name, image_size, 28, "omit --image-size")
        train = load_idx_split(root, spec, train=True, download=download)
        test = load_idx_split(root, spec, train=False, download=download)
        return DatasetSplits(name, train, None, test, spec.class_names, None, None)


_register_idx("mnist", MNIST, "MNIST", allows_flip=False)  # a mirrored digit is another symbol (or none)
_register_idx("fashion-mnist", FASHION_MNIST, "FashionMNIST", allows_flip=True)


@register_dataset("cifar10", root_hint="<data-root>/cifar-10-batches-py/ holding data_batch_1..5, test_batch, "
                  "batches.meta (CIFAR-10 python version)", allows_flip=True)
def _load_cifar10(root: Path, image_size: int | None, download: bool) -> DatasetSplits:
    _fixed_size("cifar10", image_size, 32, "omit --image-size")
    train, test, class_names = load_cifar10(root, download=download)
    return DatasetSplits("cifar10", train, None, test, class_names, None, None)


@register_dataset("celeba", root_hint="<data-root> itself: a folder written by celeba_preprocess.py (train.pt, "
                  "val.pt, test.pt, stats.json)", allows_flip=True)
def _load_celeba(root: Path, image_size: int | None, download: bool) -> DatasetSplits:
    splits, class_names = load_celeba_folder(root)
    side = splits["train"].data.images.shape[-1]
    _fixed_size(f"the celeba folder {root}", image_size, side,
                f"omit --image-size or re-run celeba_preprocess.py --size {image_size}")
    val = splits["val"] if len(splits["val"].data) else None  # preprocessing may leave val empty
    return DatasetSplits("celeba", splits["train"].data, val.data if val else None, splits["test"].data,
                         class_names, splits["test"].groups, val.groups if val else None)


@register_dataset("imagefolder", root_hint="<data-root>/train/<class>/*.jpg, <data-root>/test/<class>/*.jpg and "
                  "optionally <data-root>/val/<class>/*.jpg (one subfolder per class, the same classes in every "
                  "split)", allows_flip=True)
def _load_imagefolder(root: Path, image_size: int | None, download: bool) -> DatasetSplits:
    parts, class_names = load_imagefolder(root, image_size)
    return DatasetSplits("imagefolder", parts["train"], parts.get("val"), parts["test"], class_names, None, None)


SYNTHETIC_IMAGE_SIZE = 32  # generated images: CIFAR-10's size unless --image-size says otherwise


@register_dataset("synthetic", root_hint="nothing: the images are generated from random processes (dead leaves, "
                  "1/f noise; no real data, so pretraining on them costs no privacy)", allows_flip=True)
def _load_synthetic(root: Path, image_size: int | None, download: bool) -> DatasetSplits:
    del root, download  # nothing is read
    train, test, class_names = load_synthetic(image_size=image_size or SYNTHETIC_IMAGE_SIZE)
    return DatasetSplits("synthetic", train, None, test, class_names, None, None)


@register_dataset("python", root_hint="nothing: the data is handed over from Python (dpvision.fit)", allows_flip=False)
def _load_python(root: Path, image_size: int | None, download: bool) -> DatasetSplits:
    raise DataError("data.dataset python is data handed over from Python: pass it to dpvision.fit(...)")


DATASETS = tuple(DATASET_REGISTRY)


def data_fingerprint(data: ImageTensors) -> str:
    """sha256 hex of what is trained on: image and label shapes, dtypes and bytes.

    Example:
        >>> import torch
        >>> a = ImageTensors(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), (0.5,), (0.5,))
        >>> b = ImageTensors(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([1, 0]), (0.5,), (0.5,))
        >>> data_fingerprint(a) == data_fingerprint(a.subset(torch.arange(2)))
        True
        >>> data_fingerprint(a) == data_fingerprint(b)  # labels swapped
        False
    """
    images = data.images.detach().cpu().contiguous()
    labels = data.labels.detach().cpu().to(dtype=data.labels.dtype).contiguous()
    digest = hashlib.sha256(b"dpvision-data-fingerprint v1\n")
    digest.update(f"images {images.dtype} {list(images.shape)}; labels {labels.dtype} {list(labels.shape)}\n".encode())
    digest.update(memoryview(images.numpy()).cast("B"))
    digest.update(memoryview(labels.numpy()).cast("B"))
    return digest.hexdigest()

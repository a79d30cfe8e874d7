"""Turn a subset folder into one tensor file per split, plus train statistics.

For every image of ``subset_index.csv``: a deterministic centre crop of
``crop x crop`` pixels (178: the full width of an aligned CelebA image, cutting
20 px off top and bottom), then an antialiased resize to ``size x size`` with
PIL's LANCZOS filter (no ``reducing_gap`` shortcut, so the result depends on
nothing but the input pixels). Output folder::

    train.pt, val.pt, test.pt   {"images": uint8 [N, 3, S, S], "labels": int64 [N],
                                 "strata": list[str], "image_ids": list[str],
                                 "class_names": list[str]}
    stats.json                  per-channel mean/std of train (0..1 scale), sizes, counts

``stats.json``'s mean/std describe the training split for people (the CelebA seed
asks for them); training never reads them: a statistic of the private training set
used to normalise would be a release outside ε, so every split is normalised with
the fixed (0.5, 0.5) instead (docs/privacy.md, "Normalisation"). ``--size`` is
bounded by :data:`dpvision.data.MAX_IMAGE_SIZE`, the bound of ``dpvision train
--image-size``.

Files load with ``torch.load(..., weights_only=True)``; :func:`load_split` wraps that.
The folder is staged and renamed into place, and carries the marker that lets a
later ``--overwrite`` replace it; the subset, its parents and its sub-folders
are never written to (:mod:`dpvision.celeba.safety`). Every ``dest_path`` of
the index must be ``<split>/<class_name>/<image_id>``, so nothing outside the
subset is read, and an image that is not a regular file (a FIFO) is refused.

Example:
    >>> preprocess("data/celeba/subsets/eyeglasses", "data/celeba/preprocessed/eyeglasses_64")  # doctest: +SKIP
    >>> data, meta = load_split("data/celeba/preprocessed/eyeglasses_64", "train")              # doctest: +SKIP
    >>> data.images.shape, meta["class_names"]                                                    # doctest: +SKIP
    (torch.Size([16000, 3, 64, 64]), ['no_eyeglasses', 'eyeglasses'])
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpvision.celeba.archive import SPLITS, CelebaDataError, read_lines
from dpvision.celeba.safety import (
    check_image_id, check_image_size, file_problem, interruptible_map, prepare_output, staged_output,
)  # fmt: skip
from dpvision.celeba.subset import INDEX_FILE, SUMMARY_FILE
from dpvision.data.imagefolder import MAX_IMAGE_SIZE
from dpvision.data.tensors import ImageTensors
from dpvision.runs import atomic_torch_save, atomic_write_json

DEFAULT_SIZE = 64
DEFAULT_CROP = 178
STATS_FILE = "stats.json"
RESAMPLE = Image.Resampling.LANCZOS
DECODE_THREADS = 4  # PIL decodes and resizes without the GIL
PROGRESS_MIN_IMAGES = 200
_REQUIRED_COLUMNS = ("image_id", "label", "class_name", "split", "dest_path")
OUTPUT_KIND = "celeba-preprocessed"  # the marker kind: --overwrite replaces only a folder of this kind


def crop_and_resize(img: Image.Image, crop: int = DEFAULT_CROP, size: int = DEFAULT_SIZE) -> np.ndarray:
    """uint8 [3, size, size]: centre ``crop`` x ``crop`` square, then LANCZOS resize.

    Example:
        >>> crop_and_resize(Image.new("RGB", (178, 218)), 178, 64).shape
        (3, 64, 64)
    """
    img = img.convert("RGB")
    width, height = img.size
    if crop > width or crop > height:
        raise ValueError(f"--crop {crop} is larger than the image ({width}x{height})")
    left, top = (width - crop) // 2, (height - crop) // 2  # floor: the same pixels on every run
    img = img.crop((left, top, left + crop, top + crop))
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std on the 0..1 scale of uint8 [N, C, H, W], exactly.

    Counting each of the 256 values per channel keeps memory small and the sums exact.

    Example:
        >>> channel_stats(np.array([[[[0, 255]]]], dtype=np.uint8))
        ([0.5], [0.5])
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        n = hist.sum()
        mean = float((hist * values).sum() / n)
        means.append(mean)
        stds.append(float(np.sqrt((hist * (values - mean) ** 2).sum() / n)))
    return means, stds


def _read_index(subset_dir: Path) -> tuple[list[dict[str, str]], list[str], str]:
    index = subset_dir / INDEX_FILE
    if not subset_dir.is_dir():
        raise CelebaDataError(f"--subset-dir {str(subset_dir)!r} is not a directory")
    if not os.path.lexists(index):
        raise CelebaDataError(f"missing {index}: --subset-dir must be a folder made by celeba_build_subset.py")
    lines = read_lines(index)  # UTF-8, a regular file, bounded in size
    try:
        rows = list(csv.DictReader(lines))
    except csv.Error as err:
        raise CelebaDataError(f"{index}: {err}") from None
    header = lines[0].split(",") if lines else []
    missing = [c for c in _REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CelebaDataError(f"{index}: missing column(s) {missing}")
    for lineno, row in enumerate(rows, start=2):
        if row["split"] not in SPLITS or row["label"] not in ("0", "1"):
            raise CelebaDataError(f"{index}:{lineno}: bad split {row['split']!r} or label {row['label']!r}")
        check_image_id(row["image_id"], f"{index}:{lineno}")
        check_image_id(row["class_name"], f"{index}:{lineno}: class_name")
        if row["dest_path"] != f"{row['split']}/{row['class_name']}/{row['image_id']}":
            raise CelebaDataError(f"{index}:{lineno}: dest_path {row['dest_path']!r} must be "
                                  f"'<split>/<class_name>/<image_id>' inside the subset")
    names = ["", ""]
    summary = subset_dir / SUMMARY_FILE
    if os.path.lexists(summary):
        text = "\n".join(read_lines(summary))
        try:
            names = json.loads(text)
        except ValueError as err:
            raise CelebaDataError(f"{summary}: not valid JSON ({err})") from None
        names = names.get("class_names") if isinstance(names, dict) else None
        if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)):
            raise CelebaDataError(f"{summary}: class_names must be a list of two names, got {names!r}")
        names = list(names)
    for row in rows:  # the index itself is the authority when there is no summary
        names[int(row["label"])] = names[int(row["label"])] or row["class_name"]
    return rows, names, hashlib.sha256(index.read_bytes()).hexdigest()


def _load(job: tuple[Path, int, int]) -> np.ndarray:
    path, crop, size = job
    problem = file_problem(path)  # raises for a FIFO: it is never opened
    if problem is not None:
        raise CelebaDataError(f"image listed in {INDEX_FILE} is missing: {path}" if problem == "missing"
                              else f"cannot read image {path}: {problem}")
    try:
        with Image.open(path) as img:
            check_image_size(*img.size, path)  # before decoding: a huge image could exhaust memory
            return crop_and_resize(img, crop, size)
    except FileNotFoundError:
        raise CelebaDataError(f"image listed in {INDEX_FILE} is missing: {path}") from None
    except CelebaDataError:
        raise
    except ValueError as err:
        raise CelebaDataError(f"{path}: {err}") from None
    except OSError as err:
        raise CelebaDataError(f"cannot read image {path}: {err}") from None


def preprocess(subset_dir: str | os.PathLike, output_dir: str | os.PathLike, *, size: int = DEFAULT_SIZE,
               crop: int = DEFAULT_CROP, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Write ``<split>.pt`` for train/val/test and ``stats.json`` to ``output_dir``; returns the stats dict.

    Built in a temporary sibling folder and renamed into place; an existing
    ``output_dir`` is refused unless ``overwrite`` and it is an earlier
    preprocessed folder. Same input -> same bytes.
    """
    subset_dir = Path(subset_dir)
    if not 1 <= size <= MAX_IMAGE_SIZE:  # before any work: 100000 px would be 30 GB per image
        raise CelebaDataError(f"--size must be an integer from 1 to {MAX_IMAGE_SIZE} (the bound of dpvision train "
                              f"--image-size), got {size}")
    if crop < 1:
        raise CelebaDataError(f"--crop must be positive, got {crop}")
    output = dict(kind=OUTPUT_KIND, flag="--output-dir", overwrite=overwrite, inputs=[("--subset-dir", subset_dir)])
    prepare_output(output_dir, **output)  # refuse a bad --output-dir before any work
    rows, names, index_sha = _read_index(subset_dir)
    if not any(r["split"] == "train" for r in rows):
        raise CelebaDataError(f"{subset_dir / INDEX_FILE}: no train images, so no statistics can be computed")

    splits = {}
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        jobs = [(subset_dir / r["dest_path"], crop, size) for r in part]
        disable = (None if len(jobs) >= PROGRESS_MIN_IMAGES else True) if progress is None else not progress
        arrays = interruptible_map(_load, jobs, threads=DECODE_THREADS, desc=f"preprocessing {split}", disable=disable)
        images = np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.uint8)
        splits[split] = {
            "images": torch.from_numpy(images),
            "labels": torch.tensor([int(r["label"]) for r in part], dtype=torch.int64),
            "strata": [r.get("stratum", "all") for r in part],
            "image_ids": [r["image_id"] for r in part],
            "class_names": list(names),
        }
    mean, std = channel_stats(splits["train"]["images"].numpy())
    stats = {
        "mean": mean, "std": std, "scale": "0..1", "computed_on": "train",
        "size": size, "crop": crop, "resample": "PIL LANCZOS", "class_names": names,
        "counts": {s: len(splits[s]["image_ids"]) for s in SPLITS},
        "subset_dir": str(subset_dir), "subset_index_sha256": index_sha,
    }

    with staged_output(output_dir, **output) as tmp:
        for split, payload in splits.items():
            atomic_torch_save(payload, tmp / f"{split}.pt")
        atomic_write_json(tmp / STATS_FILE, stats)
    return stats


def load_split(preprocessed_dir: str | os.PathLike, split: str) -> tuple[ImageTensors, dict]:
    """``(ImageTensors, meta)`` for one split, normalised with the fixed (0.5, 0.5), never ``stats.json``'s.

    ``meta`` holds ``image_ids``, ``strata``, ``class_names`` and ``stats``. The files are read
    (and checked) by :func:`dpvision.data.celeba_folder.load_celeba_folder`, the reader the
    training job uses: one reader of the format.
    """
    from dpvision.data.celeba_folder import load_celeba_folder
    from dpvision.data.files import DataError

    if split not in SPLITS:
        raise CelebaDataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    try:
        splits, class_names = load_celeba_folder(preprocessed_dir)
    except DataError as err:
        raise CelebaDataError(f"{err} (run celeba_preprocess.py first)") from None
    part = splits[split]
    stats = json.loads((Path(preprocessed_dir) / STATS_FILE).read_text())
    meta = {"image_ids": list(part.image_ids or ()), "strata": list(part.groups or ()),
            "class_names": list(class_names), "stats": stats}
    return part.data, meta

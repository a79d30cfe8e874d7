"""A preprocessed CelebA folder (written by ``scripts/celeba_preprocess.py``), validated as it is loaded.

Format (see :mod:`dpvision.celeba.preprocessing`)::

    train.pt, val.pt, test.pt   {"images": uint8 [N, 3, S, S], "labels": int64 [N],
                                 "strata": list[str], "image_ids": list[str], "class_names": list[str]}
    stats.json                  {"mean": [3], "std": [3], "class_names": [...], "counts": {...}, ...}

Every count comes from the tensors actually loaded, never from ``stats.json``
(its ``counts`` are only compared, with a warning when they disagree): the
number of training examples sets the sampling rate, hence the privacy
accounting. Normalisation is the fixed :func:`~dpvision.data.tensors.neutral_stats`
(0.5, 0.5 per channel) for DP and non-DP runs alike: ``stats.json``'s train
mean/std are a description of the private training split, never read here, so
no statistic of it reaches a model outside ε (docs/privacy.md, "Normalisation").
Files load with ``weights_only=True`` and are size-bounded first; anything
truncated, garbled or inconsistent is a one-line ``DataError`` naming the file.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from dpvision.data.files import DataError, DataNotFoundError, check_total_bytes, open_regular, read_regular, \
    regular_file_stat
from dpvision.data.tensors import ImageTensors, neutral_stats

SPLITS = ("train", "val", "test")
CHANNELS = 3  # RGB: what celeba_preprocess.py writes
STATS_FILE = "stats.json"
MAX_STATS_BYTES = 1 << 20
FOLDER_HINT = "a folder written by celeba_preprocess.py (train.pt, val.pt, test.pt, stats.json)"


@dataclass(frozen=True)
class CelebaSplit:
    data: ImageTensors
    groups: tuple[str, ...] | None  # per-image stratum (e.g. interocular bin), None if the file has none
    image_ids: tuple[str, ...] | None


def _read_stats(path: Path) -> dict:
    """stats.json as a dict: only its ``class_names`` and ``counts`` are compared; mean/std are never read."""
    try:
        stats = json.loads(read_regular(path, MAX_STATS_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); re-run celeba_preprocess.py") from None
    if not isinstance(stats, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(stats).__name__}")
    return stats


def _strings(value: object, n: int, path: Path, key: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(isinstance(v, str) for v in value):
        got = f"{type(value).__name__} of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__
        raise DataError(f"{path}: {key!r} must be a list of {n} strings (one per image), got {got}")
    return tuple(value)


def _read_split(path: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[CelebaSplit, tuple[str, ...]]:
    try:
        with open_regular(path) as handle:
            payload = torch.load(handle, map_location="cpu", weights_only=True)
    except DataError:
        raise
    except Exception as err:  # truncated zip, garbage, a pickle with forbidden globals, ...
        first = str(err).splitlines()[0] if str(err) else ""
        if "Weights only load failed" in first:
            first = "garbage, or objects other than tensors, lists and strings (refused by weights_only loading)"
        raise DataError(f"{path}: not a readable tensor file ({type(err).__name__}: {first[:200]}); "
                        "re-run celeba_preprocess.py") from None
    if not isinstance(payload, dict) or not {"images", "labels", "class_names"} <= payload.keys():
        keys = sorted(map(str, payload.keys()))[:8] if isinstance(payload, dict) else type(payload).__name__
        raise DataError(f"{path}: expected a dict with 'images', 'labels', 'class_names' (and 'strata'), got {keys}")
    images, labels = payload["images"], payload["labels"]
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 \
            or images.shape[1] != len(mean):
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"{path}: 'images' must be uint8 [N, {len(mean)}, H, W], got {got}")
    n = images.shape[0]
    if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.dtype.is_floating_point \
            or labels.dtype.is_complex or labels.dtype == torch.bool:
        got = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise DataError(f"{path}: 'labels' must be integers [{n}] (one per image), got {got}")
    names = payload["class_names"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(c, str) and c for c in names):
        raise DataError(f"{path}: 'class_names' must be a list of at least 2 names, got {names!r}"[:300])
    labels = labels.long()
    if n and not (0 <= int(labels.min()) and int(labels.max()) < len(names)):
        raise DataError(f"{path}: labels must be in 0..{len(names) - 1} (one per class name), found "
                        f"{int(labels.min())}..{int(labels.max())}")
    groups = _strings(payload["strata"], n, path, "strata") if "strata" in payload else None
    ids = _strings(payload["image_ids"], n, path, "image_ids") if "image_ids" in payload else None
    return CelebaSplit(ImageTensors(images, labels, mean, std), groups, ids), tuple(names)


def load_celeba_folder(folder: str | os.PathLike) -> tuple[dict[str, CelebaSplit], tuple[str, ...]]:
    """``({split: CelebaSplit}, class_names)`` for train, val and test of a preprocessed folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataNotFoundError(f"--data-root {str(folder)!r} is not a directory; for celeba it must be {FOLDER_HINT}")
    paths = {name: folder / name for name in (*(f"{s}.pt" for s in SPLITS), STATS_FILE)}
    missing = [name for name, path in paths.items() if not os.path.lexists(path)]
    if missing:
        raise DataNotFoundError(f"missing {', '.join(str(paths[name]) for name in missing)}; --data-root for "
                                f"celeba must be {FOLDER_HINT}")
    sizes = sum(regular_file_stat(path).st_size for path in paths.values())
    check_total_bytes(sizes, f"the CelebA files in {folder}", "these are not preprocessed CelebA splits")
    stats = _read_stats(paths[STATS_FILE])
    mean, std = neutral_stats(CHANNELS)  # never stats.json's: those describe the private training split

    splits, class_names = {}, None
    for split in SPLITS:
        path = paths[f"{split}.pt"]
        splits[split], names = _read_split(path, mean, std)
        if class_names is None:
            class_names = names
        elif names != class_names:
            raise DataError(f"{path}: class_names {list(names)} differ from train.pt's {list(class_names)}")
        shape, want = splits[split].data.images.shape[1:], splits["train"].data.images.shape[1:]
        if shape != want:
            raise DataError(f"{path}: images are {list(shape)} but train.pt's are {list(want)}; re-run "
                            "celeba_preprocess.py")
    if "class_names" in stats and stats["class_names"] != list(class_names):
        raise DataError(f"{paths[STATS_FILE]}: class_names {stats['class_names']} differ from the .pt files' "
                        f"{list(class_names)}")
    for split in ("train", "test"):
        if len(splits[split].data) == 0:
            raise DataError(f"{paths[f'{split}.pt']} holds no images; {split} needs at least one")
    _compare_counts(stats.get("counts"), splits, paths[STATS_FILE])
    return splits, class_names


def _compare_counts(counts: object, splits: dict[str, CelebaSplit], stats_path: Path) -> None:
    """Warn (never trust) when stats.json's counts differ from the tensors."""
    if not isinstance(counts, dict):
        return
    actual = {split: len(part.data) for split, part in splits.items()}
    differ = {s: counts.get(s) for s in SPLITS if counts.get(s) != actual[s]}
    if differ:
        warnings.warn(f"{stats_path}: counts {differ} differ from the tensors ({actual}); using the tensors' counts")

"""A balanced, optionally stratified subset of CelebA for one binary attribute.

The strategy (``docs/data/subset_strategy.md`` has a worked example):

1. Splits are CelebA's official partitions (0 train, 1 val, 2 test); no image
   moves between them.
2. Classes are ``<attr>`` (attribute = 1) and ``no_<attr>`` (attribute = -1),
   labels 1 and 0. Each split gets the same count of both classes: at most the
   per-class cap (``--max-per-class-<split>``, else the ``--total`` ratio policy
   ``floor(0.8N/2), floor(0.1N/2), floor(0.1N/2)``, else no cap).
3. Stratification (``--stratify-by interocular Male ...``) cuts each split into
   strata; in every stratum both classes get the same count, so each stratifying
   variable has the same distribution in both classes. A split's per-class count
   is shared out over strata in proportion to what each can give
   (``min(#pos, #neg)`` in it), remainders by largest remainder. Interocular
   bins are quantiles of the *train* partition (equal-width if quantiles tie).
4. Inside a stratum the images are a seeded random choice; the rest of the
   stratum, in the same seeded order, replaces any image that is missing or
   unreadable (every chosen image is opened and decoded). Something that is
   not a regular file (a FIFO) is refused, never opened.

The output folder is staged and renamed into place, and carries the marker that
lets a later ``--overwrite`` replace it (:mod:`dpvision.celeba.safety`).

Example:
    >>> summary = build_subset("data/celeba/archive", "data/celeba/subsets/demo",   # doctest: +SKIP
    ...                        use_landmarks=True, stratify_by=["interocular"], total=2000)
    >>> summary["totals"]["train"]                                                   # doctest: +SKIP
    {'no_eyeglasses': 800, 'eyeglasses': 800, 'total': 1600}
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from dpvision.celeba.archive import (
    PARTITION_CODES, SPLITS, CelebaDataError, class_names, read_archive, validate_attribute,
)  # fmt: skip
from dpvision.celeba.safety import check_output_dir, prepare_output, staged_output
from dpvision.celeba.verify import replace_bad_images

DEFAULT_SEED = 1337
DEFAULT_ARCHIVE_DIR = "data/celeba/archive"
LINK_MODES = ("copy", "symlink", "hardlink")
INTEROCULAR = "interocular"
IOD_COLUMN = "iod_bin"
#: ``--total N`` -> per-class caps: floor(0.8N/2), floor(0.1N/2), floor(0.1N/2) (numerator, denominator).
RATIO_POLICY = {"train": (8, 20), "val": (1, 20), "test": (1, 20)}
INDEX_FILE = "subset_index.csv"
OUTPUT_KIND = "celeba-subset"  # the marker kind: --overwrite replaces only a folder of this kind
SUMMARY_FILE = "subset_summary.json"
PROGRESS_MIN_IMAGES = 200  # below this a progress bar is noise


def caps_from_total(total: int) -> dict[str, int]:
    """Per-class caps of the ratio policy (80/10/10 splits, 50/50 classes).

    Example:
        >>> caps_from_total(20000)
        {'train': 8000, 'val': 1000, 'test': 1000}
    """
    return {split: (num * total) // den for split, (num, den) in RATIO_POLICY.items()}


def parse_stratify_by(values: Iterable[str] | None) -> list[str]:
    """``["interocular Male", "Young"]`` or ``"interocular,Male"`` -> canonical names, in order, once each."""
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for token in re.split(r"[\s,]+", " ".join(values or [])):
        if not token:
            continue
        name = INTEROCULAR if token.lower() in (INTEROCULAR, "iod") else validate_attribute(token)
        if name not in out:
            out.append(name)
    return out


def iod_bin_edges(train_iod: np.ndarray, bins: int) -> tuple[list[float], str]:
    """Inner edges of ``bins`` quantile bins of ``train_iod`` (equal-width when quantiles tie).

    Example:
        >>> iod_bin_edges(np.array([30., 32., 40., 48.]), 2)
        ([36.0], 'quantile')
    """
    if train_iod.size == 0:
        raise CelebaDataError("--stratify-by interocular: the train partition has no eligible images to bin")
    edges = np.quantile(train_iod, np.arange(1, bins) / bins)
    if bins > 1 and np.any(np.diff(np.concatenate([[train_iod.min()], edges, [train_iod.max()]])) <= 0):
        return np.linspace(train_iod.min(), train_iod.max(), bins + 1)[1:-1].tolist(), "equal-width"
    return edges.tolist(), "quantile"


def allocate(total: int, capacities: list[int]) -> list[int]:
    """Share ``total`` over strata in proportion to ``capacities``, largest remainder first.

    Never gives a stratum more than its capacity; ties go to the earlier stratum.

    Example:
        >>> allocate(10, [10, 5, 5])
        [5, 3, 2]
    """
    available = sum(capacities)
    total = min(total, available)
    if total == 0:
        return [0] * len(capacities)
    exact = [total * c / available for c in capacities]
    quotas = [min(c, int(total * c // available)) for c in capacities]
    order = sorted(range(len(capacities)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


@dataclass(frozen=True)
class SubsetOptions:
    """What ``build_subset`` builds: its keyword arguments (the command's flags), with their defaults."""

    attribute: str = "Eyeglasses"
    use_landmarks: bool = False
    stratify_by: Iterable[str] | str | None = None
    iod_bins: int = 4
    link_mode: str = "symlink"
    max_per_class_train: int | None = None
    max_per_class_val: int | None = None
    max_per_class_test: int | None = None
    total: int | None = None
    min_iod: float | None = None
    max_iod: float | None = None
    seed: int = DEFAULT_SEED
    dry_run: bool = False
    overwrite: bool = False
    strict_missing: bool = False


def build_subset(
    archive_dir: str | os.PathLike = DEFAULT_ARCHIVE_DIR,
    output_dir: str | os.PathLike | None = None,
    *,
    progress: bool | None = None,
    warn: Callable[[str], None] | None = None,
    **options,
) -> dict:
    """Build the subset into ``output_dir`` (or only plan it with ``dry_run``); returns the summary dict.

    ``options`` are the fields of :class:`SubsetOptions` (an unknown one is a ``TypeError``).
    Raises :class:`CelebaDataError` for every bad input; warnings (e.g. caps the
    archive cannot fill) go to ``warn`` (default: ``warning: ...`` on stderr)
    and into the summary. ``progress=None`` shows tqdm bars only on a terminal.
    """
    o = SubsetOptions(**options)
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    archive_dir = Path(archive_dir)
    if output_dir is None:
        raise CelebaDataError("--output-dir is required")
    output_dir = Path(output_dir)
    attribute, strat, caps, cap_source = _check_options(o)
    inputs = [("--archive-dir", archive_dir)]
    (check_output_dir if o.dry_run else prepare_output)(  # a dry run cleans up nothing: it writes nothing
        output_dir, kind=OUTPUT_KIND, flag="--output-dir", overwrite=o.overwrite, inputs=inputs)

    archive = read_archive(archive_dir, need_landmarks=o.use_landmarks)
    names = class_names(attribute)
    labels = archive.attribute(attribute)
    iod, split_of = _eligible(archive, o)
    columns, edges, bin_method = _strata_columns(archive, strat, iod, split_of == PARTITION_CODES["train"], o.iod_bins)
    selected, reserves, available, balanced, warnings = _select(
        split_of, labels, columns, names, caps, cap_source, o.seed, warn)
    # The summary's "arguments": the options in SubsetOptions' order, the validated attribute and strata.
    arguments = {"archive_dir": str(archive_dir), "output_dir": str(output_dir), "attribute": attribute,
                 **{f.name: strat if f.name == "stratify_by" else getattr(o, f.name) for f in fields(o)
                    if f.name not in ("attribute", "dry_run", "overwrite")}}
    summary = {
        "attribute": attribute, "class_names": names, "seed": o.seed, "arguments": arguments, "caps": caps,
        "cap_source": cap_source, "stratify_columns": list(columns), "iod_bin_edges": edges,
        "iod_bin_method": bin_method, "available": available, "balanced_available_per_class": balanced,
        "warnings": warnings, "source_checksums": archive.checksums, "dry_run": o.dry_run,
    }
    _fill_counts(summary, selected, names)
    if o.dry_run:
        return summary  # a plan only: no image is opened, nothing is written

    n_chosen = sum(len(chosen) for chosen in selected.values())
    replacements, drops = replace_bad_images(archive, selected, reserves, o.strict_missing, _no_bar(progress, n_chosen))
    _record_replacements(summary, replacements, drops, warn)
    if drops:
        _fill_counts(summary, selected, names)
    rows, index_fields = _index_rows(archive, selected, columns, iod, names)
    with staged_output(output_dir, kind=OUTPUT_KIND, flag="--output-dir", overwrite=o.overwrite, inputs=inputs) as tmp:
        _write_output(tmp, rows, index_fields, summary, o.link_mode, progress)
    return summary


def _eligible(archive, o: SubsetOptions) -> tuple[np.ndarray | None, np.ndarray]:
    """Interocular distances [N] (with landmarks) and each image's partition code [N], -1 outside the iod range."""
    iod = archive.interocular() if o.use_landmarks else None
    eligible = np.ones(len(archive), dtype=bool)
    if o.min_iod is not None:
        eligible &= iod >= o.min_iod
    if o.max_iod is not None:
        eligible &= iod <= o.max_iod
    return iod, np.where(eligible, archive.partitions, -1)


def _record_replacements(summary: dict, replacements: list[dict], drops: list[dict], warn) -> None:
    summary["replacements"] = {
        "total": len(replacements),
        "by_split": {s: sum(1 for r in replacements if r["split"] == s) for s in SPLITS},
        "images": replacements,
    }
    summary["dropped"] = drops
    if drops:
        msg = (f"{sum(d['reason'] != 'balance' for d in drops)} bad image(s) had no spare in their split, class and "
               f"stratum; dropped {len(drops)} image(s) in all to keep the classes balanced")
        summary["warnings"].append(msg)
        warn(msg)


def _check_options(o: SubsetOptions) -> tuple[str, list[str], dict, dict]:
    """``(attribute, stratifying variables, per-class caps, where each cap came from)``; bad flags raise."""
    attribute = validate_attribute(o.attribute)
    strat = parse_stratify_by(o.stratify_by)
    if attribute in strat:
        raise CelebaDataError(f"--stratify-by cannot include the target attribute {attribute}")
    if o.link_mode not in LINK_MODES:
        raise CelebaDataError(f"--link-mode must be one of {', '.join(LINK_MODES)}, got {o.link_mode!r}")
    if INTEROCULAR in strat and not o.use_landmarks:
        raise CelebaDataError("--stratify-by interocular needs --use-landmarks")
    if (o.min_iod is not None or o.max_iod is not None) and not o.use_landmarks:
        raise CelebaDataError("--min-iod/--max-iod need --use-landmarks")
    if o.iod_bins < 1:
        raise CelebaDataError(f"--iod-bins must be at least 1, got {o.iod_bins}")
    explicit = {"train": o.max_per_class_train, "val": o.max_per_class_val, "test": o.max_per_class_test}
    for split, cap in explicit.items():
        if cap is not None and cap < 0:
            raise CelebaDataError(f"--max-per-class-{split} must be >= 0, got {cap}")
    if o.total is not None and o.total < 0:
        raise CelebaDataError(f"--total must be >= 0, got {o.total}")
    ratio = caps_from_total(o.total) if o.total is not None else {}
    caps = {s: explicit[s] if explicit[s] is not None else ratio.get(s) for s in SPLITS}
    cap_source = {s: f"--max-per-class-{s}" if explicit[s] is not None else ("--total" if s in ratio else "none") for s in SPLITS}
    return attribute, strat, caps, cap_source


def _strata_columns(archive, strat: list[str], iod, train: np.ndarray, iod_bins: int) -> tuple[dict, list | None, str | None]:
    """One integer column [N] per stratifying variable, and the interocular bin edges (train quantiles)."""
    columns: dict[str, np.ndarray] = {}
    edges, bin_method = None, None
    for var in strat:
        if var == INTEROCULAR:
            edges, bin_method = iod_bin_edges(iod[train], iod_bins)
            columns[IOD_COLUMN] = np.searchsorted(np.asarray(edges), iod, side="right").astype(np.int64)
        else:
            columns[var] = archive.attribute(var).astype(np.int64)
    return columns, edges, bin_method


def _select(split_of, labels, columns, names, caps, cap_source, seed, warn) -> tuple:
    """Per split, class and stratum: the seeded choice and its reserve, plus what was available and warnings."""
    # Imported here, not at the top: dpvision.seeding imports torch (seconds of start-up), which flag and
    # archive errors should not have to wait for.
    from dpvision.seeding import derive_seed

    col_names = list(columns)
    keys = np.stack([columns[c] for c in col_names], axis=1) if col_names else np.zeros((len(split_of), 0), np.int64)

    def stratum_name(key: tuple[int, ...]) -> str:
        return "|".join(f"{c}={v}" for c, v in zip(col_names, key)) or "all"

    selected, reserves, available, balanced, warnings = {}, {}, {}, {}, []
    for split in SPLITS:
        in_split = split_of == PARTITION_CODES[split]
        available[split] = {names[c]: int((in_split & (labels == c)).sum()) for c in (0, 1)}
        groups: dict[tuple[int, ...], list[list[int]]] = {}
        for i in np.flatnonzero(in_split):  # archive order, so the seeded shuffle sees a fixed input
            groups.setdefault(tuple(int(v) for v in keys[i]), [[], []])[int(labels[i])].append(int(i))
        strata = sorted(groups)
        capacity = [min(len(groups[k][0]), len(groups[k][1])) for k in strata]
        balanced[split] = sum(capacity)
        per_class = balanced[split] if caps[split] is None else min(caps[split], balanced[split])
        if caps[split] is not None and caps[split] > balanced[split]:
            msg = (f"{cap_source[split]} asks for {caps[split]} per class but {split} has "
                   f"{names[1]}={available[split][names[1]]}, {names[0]}={available[split][names[0]]}"
                   + (f" ({balanced[split]} per class when balanced within strata)" if col_names else "")
                   + f"; using {per_class} per class")
            warnings.append(msg)
            warn(msg)
        for key, quota in zip(strata, allocate(per_class, capacity)):
            for c in (0, 1):
                pool = np.asarray(groups[key][c])
                rng = np.random.default_rng(derive_seed(seed, f"subset:{split}:{names[c]}:{stratum_name(key)}"))
                order = pool[rng.permutation(len(pool))].tolist()
                selected[(split, c, stratum_name(key))] = order[:quota]
                reserves[(split, c, stratum_name(key))] = order[quota:]
    return selected, reserves, available, balanced, warnings


def _index_rows(archive, selected: dict, columns: dict, iod, names: list[str]) -> tuple[list[dict], list[str]]:
    """The rows of ``subset_index.csv`` (sorted by split, label, image id) and its field names."""
    col_names = list(columns)
    rows = []
    for split in SPLITS:
        for c in (0, 1):
            for (s, cc, stratum), chosen in selected.items():
                if s != split or cc != c:
                    continue
                for i in chosen:
                    image_id = archive.image_ids[i]
                    row = {"image_id": image_id, "label": c, "class_name": names[c], "split": split, "stratum": stratum}
                    row.update({col: int(columns[col][i]) for col in col_names})
                    if iod is not None:
                        row["interocular_distance"] = f"{iod[i]:.3f}"
                    row["source_path"] = str(archive.image_path(image_id).resolve())
                    row["dest_path"] = f"{split}/{names[c]}/{image_id}"
                    rows.append(row)
    rows.sort(key=lambda r: (SPLITS.index(r["split"]), r["label"], r["image_id"]))
    fields = ["image_id", "label", "class_name", "split", "stratum", *col_names]
    fields += (["interocular_distance"] if iod is not None else []) + ["source_path", "dest_path"]
    return rows, fields


def _fill_counts(summary: dict, selected: dict, names: list[str]) -> None:
    """``counts`` (split -> class -> stratum -> n), ``totals`` and ``total`` from the selection."""
    counts = {s: {names[c]: {} for c in (0, 1)} for s in SPLITS}
    for (split, c, stratum), chosen in sorted(selected.items()):
        counts[split][names[c]][stratum] = len(chosen)
    summary["counts"] = counts
    summary["totals"] = {s: {**{n: sum(counts[s][n].values()) for n in names},
                             "total": sum(sum(counts[s][n].values()) for n in names)} for s in SPLITS}
    summary["total"] = sum(summary["totals"][s]["total"] for s in SPLITS)


def _no_bar(progress: bool | None, n: int) -> bool | None:
    if progress is None:
        return None if n >= PROGRESS_MIN_IMAGES else True  # None: tqdm decides (off when not a terminal)
    return not progress


def _place(src: str, dest: Path, link_mode: str) -> None:
    if link_mode == "copy":
        shutil.copyfile(src, dest)
    elif link_mode == "symlink":
        os.symlink(src, dest)  # absolute, so the link survives renaming the output folder
    else:
        try:
            os.link(src, dest)
        except OSError as err:
            raise CelebaDataError(f"--link-mode hardlink failed for {src} ({err.strerror}); "
                                  f"use --link-mode copy or symlink across filesystems") from None


def _write_output(tmp: Path, rows, fields, summary, link_mode, progress) -> None:
    """The class folders, images, index and summary, into the staging folder ``tmp``.

    Every ``dest_path`` is ``<split>/<class>/<image_id>`` with an id that
    :func:`~dpvision.celeba.safety.check_image_id` accepted, so nothing lands outside ``tmp``.
    """
    from dpvision.runs import atomic_write_json, atomic_write_text, csv_text  # lazily: imports torch

    for split in SPLITS:
        for name in summary["class_names"]:
            (tmp / split / name).mkdir(parents=True)
    for row in tqdm(rows, desc=f"{link_mode} images", unit="img", disable=_no_bar(progress, len(rows))):
        _place(row["source_path"], tmp / row["dest_path"], link_mode)
    index_text = csv_text(fields, rows)
    atomic_write_text(tmp / INDEX_FILE, index_text)
    summary["index_sha256"] = hashlib.sha256(index_text.encode()).hexdigest()
    atomic_write_json(tmp / SUMMARY_FILE, summary)

"""Reading a CelebA archive: the image folder and the four annotation tables.

Two layouts are accepted, so either download works:

* Kaggle (``jessicali9530/celeba-dataset``)::

      <root>/img_align_celeba/[img_align_celeba/]000001.jpg ...
      <root>/list_attr_celeba.csv               image_id + 40 attributes in {-1, 1}
      <root>/list_landmarks_align_celeba.csv    image_id + 10 landmark coordinates
      <root>/list_eval_partition.csv            image_id, partition (0 train, 1 val, 2 test)
      <root>/list_bbox_celeba.csv               image_id, x_1, y_1, width, height

* the original release (Google Drive / torchvision's ``CelebA``): the same
  tables as whitespace-separated ``.txt`` files, either in ``<root>`` or in
  ``<root>/Anno`` and ``<root>/Eval``, images in ``<root>/img_align_celeba`` or
  ``<root>/Img/img_align_celeba``. ``list_attr_celeba.txt`` and the landmark and
  bbox files start with a count line and a header line; ``list_eval_partition.txt``
  has neither.

The archive is only ever read. Every problem raises :class:`CelebaDataError`
with a one-line message naming the file (and line) at fault: a table that is
not UTF-8, has no rows, lists an image twice or names an image by a path
rather than a file name (:func:`~dpvision.celeba.safety.check_image_id`).

Example:
    >>> archive = read_archive("data/celeba/archive", need_landmarks=True)  # doctest: +SKIP
    >>> archive.attribute("Eyeglasses")[:3]                                  # doctest: +SKIP
    array([0, 0, 1], dtype=int8)
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from dpvision.celeba.safety import CelebaDataError, check_image_id, file_problem

#: CelebA's 40 binary attributes, in the order of the official files.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald",
    "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair",
    "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard",
    "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings",
    "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip

LANDMARK_COLUMNS: tuple[str, ...] = (
    "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y",
)  # fmt: skip
BBOX_COLUMNS: tuple[str, ...] = ("x_1", "y_1", "width", "height")

#: Base names of the annotation tables (``.csv`` for Kaggle, ``.txt`` for the original release).
ATTR_FILE = "list_attr_celeba"
LANDMARKS_FILE = "list_landmarks_align_celeba"
PARTITION_FILE = "list_eval_partition"
BBOX_FILE = "list_bbox_celeba"
IMAGE_DIR = "img_align_celeba"

#: Official partition codes.
SPLITS: tuple[str, ...] = ("train", "val", "test")
PARTITION_CODES = {"train": 0, "val": 1, "test": 2}

# Sub-folders where the original release keeps its tables and images.
_TABLE_DIRS = (".", "Anno", "Eval")
#: Bounds on an annotation table (the real ones: 202,599 rows, at most ~26 MB), so no file can exhaust memory.
MAX_TABLE_BYTES = 256 << 20
MAX_TABLE_ROWS = 2_000_000
#: A candidate image folder holds the images when it holds any of the first this-many listed images.
IMAGE_PROBE = 16


@dataclass
class CelebaArchive:
    """An archive's annotations, one row per image, aligned on ``image_ids``.

    ``attributes`` is int8 [N, 40] in {-1, 1}; ``partitions`` int8 [N] in {0, 1, 2};
    ``landmarks`` int32 [N, 10] (``None`` when not read); ``bbox`` int32 [N, 4] or None.
    ``files`` maps each table's base name to the path read, ``checksums`` to its sha256.
    """

    root: Path
    image_dir: Path
    image_ids: list[str]
    attributes: np.ndarray
    partitions: np.ndarray
    landmarks: np.ndarray | None = None
    bbox: np.ndarray | None = None
    files: dict[str, Path] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.image_ids)

    def attribute(self, name: str) -> np.ndarray:
        """0/1 int8 [N]: whether each image has attribute ``name``."""
        column = ATTRIBUTE_NAMES.index(validate_attribute(name))
        return (self.attributes[:, column] > 0).astype(np.int8)

    def image_path(self, image_id: str) -> Path:
        return self.image_dir / image_id

    def interocular(self) -> np.ndarray:
        """float64 [N]: Euclidean distance between the two eye landmarks, in pixels."""
        if self.landmarks is None:
            raise CelebaDataError("interocular distance needs the landmarks file (read with need_landmarks=True)")
        return interocular_distance(self.landmarks)


def interocular_distance(landmarks: np.ndarray) -> np.ndarray:
    """Distance between (lefteye_x, lefteye_y) and (righteye_x, righteye_y) for rows of ``landmarks``.

    Example:
        >>> interocular_distance(np.array([[69, 111, 108, 111, 0, 0, 0, 0, 0, 0]]))
        array([39.])
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.hypot(lm[:, 2] - lm[:, 0], lm[:, 3] - lm[:, 1])


def validate_attribute(name: str) -> str:
    """The canonical spelling of attribute ``name`` (case-insensitive), or an error listing all 40."""
    for valid in ATTRIBUTE_NAMES:
        if valid.lower() == str(name).strip().lower():
            return valid
    raise CelebaDataError(f"unknown attribute {name!r}; valid attributes: {', '.join(ATTRIBUTE_NAMES)}")


def class_names(attribute: str) -> list[str]:
    """Class names indexed by label: ``[no_<attr>, <attr>]`` lower-cased.

    Example:
        >>> class_names("Eyeglasses")
        ['no_eyeglasses', 'eyeglasses']
    """
    positive = validate_attribute(attribute).lower()
    return [f"no_{positive}", positive]


def find_image_dir(root: str | os.PathLike, image_ids: list[str], listed_in: str | os.PathLike) -> Path:
    """The folder holding the JPEGs: ``img_align_celeba/``, Kaggle's nested ``img_align_celeba/img_align_celeba/``
    or ``Img/img_align_celeba/``, whichever holds any of the first :data:`IMAGE_PROBE` ``image_ids``.

    An empty nested folder does not hide the images beside it; images in two of
    them are refused (which set is meant is not ours to guess).
    """
    root = Path(root)
    candidates = [c for c in (root / IMAGE_DIR / IMAGE_DIR, root / IMAGE_DIR, root / "Img" / IMAGE_DIR) if c.is_dir()]
    if not candidates:
        raise CelebaDataError(f"image folder not found: expected {root / IMAGE_DIR}/ (or {IMAGE_DIR}/{IMAGE_DIR}/)")
    probe = image_ids[:IMAGE_PROBE]
    holding = [c for c in candidates if any(os.path.lexists(c / image_id) for image_id in probe)]
    if len(holding) > 1:
        raise CelebaDataError(f"images are in both {holding[0]}/ and {holding[1]}/; keep them in one of the two")
    if not holding:
        raise CelebaDataError(f"none of the images listed in {listed_in} (e.g. {probe[0]}) are in "
                              + " or ".join(f"{c}/" for c in candidates))
    return holding[0]


def find_table(root: str | os.PathLike, base: str, *, required: bool = True) -> Path | None:
    """``<base>.csv`` (preferred) or ``<base>.txt`` in ``root``, ``root/Anno`` or ``root/Eval``."""
    root = Path(root)
    for ext in (".csv", ".txt"):
        for sub in _TABLE_DIRS:
            path = root / sub / f"{base}{ext}"
            if os.path.lexists(path):
                _check_regular(path)
                return path
    if required:
        raise CelebaDataError(f"missing annotation file: {root / (base + '.csv')} (or {base}.txt)")
    return None


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_regular(path: Path) -> None:
    """Refuse a FIFO, folder or device by its ``stat`` (opening a FIFO would block forever)."""
    problem = file_problem(path, "a table")
    if problem is not None:
        raise CelebaDataError(f"cannot read {path}: {problem}")


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is allowed), refused if not a regular file or too large."""
    path = Path(path)
    _check_regular(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_TABLE_BYTES + 1)
    except OSError as err:
        raise CelebaDataError(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) > MAX_TABLE_BYTES or data.count(b"\n") > MAX_TABLE_ROWS:
        raise CelebaDataError(f"{path} is larger than {MAX_TABLE_BYTES} bytes or {MAX_TABLE_ROWS} lines; "
                              f"not a CelebA table")
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CelebaDataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8") from None


def _table_header(path: Path, lines: list[str], columns: tuple[str, ...], txt_header: bool) -> tuple[list[str], Iterable, int]:
    """``(header without image_id, row iterator, line number of the first row)`` of a CSV or ``.txt`` table."""
    if path.suffix == ".csv":
        rows = csv.reader(lines)
        header = next(rows, None)
        first_line = 2
        if not header:
            raise CelebaDataError(f"{path}: empty file, expected a header line")
        header = [h.strip() for h in header]
        if header[0] != "image_id":
            raise CelebaDataError(f"{path}:1: first column must be 'image_id', got {header[0]!r}")
        header = header[1:]
        body = rows
    else:
        first_line = 1
        declared = None
        if txt_header:
            if len(lines) < 2:
                raise CelebaDataError(f"{path}: expected a count line and a header line")
            try:
                declared = int(lines[0].strip())
            except ValueError:
                raise CelebaDataError(f"{path}:1: expected the image count, got {lines[0][:40]!r}") from None
            header = lines[1].split()
            if header and header[0] == "image_id":  # the bbox file names its first column, the others don't
                header = header[1:]
            first_line = 3
            lines = lines[2:]
        else:
            if not any(line.strip() for line in lines):
                raise CelebaDataError(f"{path}: empty file, expected one row per image")
            header = list(columns)
        body = (line.split() for line in lines)
        if declared is not None and declared != sum(1 for line in lines if line.strip()):
            raise CelebaDataError(f"{path}:1: declares {declared} images but has {sum(1 for l in lines if l.strip())} rows")
    return header, body, first_line


def read_table(path: str | os.PathLike, columns: tuple[str, ...], *, txt_header: bool = True) -> tuple[list[str], list[list[str]]]:
    """Rows of ``image_id`` + ``columns`` from a CSV (with header) or a whitespace ``.txt``.

    For ``.txt``, ``txt_header`` says the file starts with a count line and a
    header line (all tables except the partition list). Columns are matched by
    name, so their order in the file does not matter. Returns ``(image_ids, values)``
    with values as strings; a malformed row, an id that is no plain file name,
    an id listed twice or a table without rows raises naming the file and line.
    """
    path = Path(path)
    header, body, first_line = _table_header(path, read_lines(path), columns, txt_header)
    missing = [c for c in columns if c not in header]
    if missing:
        raise CelebaDataError(f"{path}: header lacks column(s) {missing}")
    order = [header.index(c) + 1 for c in columns]
    width = len(header) + 1
    image_ids: list[str] = []
    values: list[list[str]] = []
    first_seen: dict[str, int] = {}
    lineno = first_line - 1
    try:
        for lineno, row in enumerate(body, start=first_line):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank lines (e.g. a trailing newline) are harmless
            if len(row) != width:
                raise CelebaDataError(f"{path}:{lineno}: expected {width} fields, got {len(row)}")
            image_id = check_image_id(row[0].strip(), f"{path}:{lineno}")
            if image_id in first_seen:  # the last row must not silently win
                raise CelebaDataError(f"{path}:{lineno}: image {image_id!r} appears twice (first on line {first_seen[image_id]})")
            first_seen[image_id] = lineno
            image_ids.append(image_id)
            values.append([row[i].strip() for i in order])
    except csv.Error as err:
        raise CelebaDataError(f"{path}:{lineno + 1}: {err}") from None
    if not image_ids:
        raise CelebaDataError(f"{path}: no image rows, only a header")
    return image_ids, values


def _to_int(path: Path, values: list[list[str]], first_line: int, allowed: set[str] | None = None) -> np.ndarray:
    try:
        array = np.array(values, dtype=np.int64) if values else np.zeros((0, 0), dtype=np.int64)
    except ValueError:
        array = None
    if array is None or (allowed is not None and array.size and not np.isin(array, [int(a) for a in allowed]).all()):
        for offset, row in enumerate(values):  # slow path only to name the bad line
            for cell in row:
                ok = cell.lstrip("-").isdigit() and (allowed is None or cell in allowed)
                if not ok:
                    want = f" (expected one of {sorted(allowed)})" if allowed else " (expected an integer)"
                    raise CelebaDataError(f"{path}:{first_line + offset}: bad value {cell!r}{want}")
    return array


def _first_data_line(path: Path, txt_header: bool = True) -> int:
    return 2 if path.suffix == ".csv" else (3 if txt_header else 1)


def _aligned(path: Path, ids: list[str], values: np.ndarray, index: dict[str, int], n_cols: int) -> np.ndarray:
    """``values`` reordered to the attribute table's image order; every image must be present."""
    out = np.zeros((len(index), n_cols), dtype=values.dtype)
    seen = np.zeros(len(index), dtype=bool)
    for row, image_id in enumerate(ids):
        position = index.get(image_id)
        if position is None:
            raise CelebaDataError(f"{path}:{_first_data_line(path) + row}: image {image_id!r} is not in {ATTR_FILE}")
        out[position] = values[row]
        seen[position] = True
    if not seen.all():
        missing = [i for i, s in zip(index, seen) if not s][:3]
        raise CelebaDataError(f"{path}: no row for {int((~seen).sum())} image(s), e.g. {missing}")
    return out


def read_archive(root: str | os.PathLike, *, need_landmarks: bool = False, need_bbox: bool = False) -> CelebaArchive:
    """Read the tables of the archive at ``root`` (never writing to it).

    The attribute and partition tables and the image folder are always required;
    landmarks only with ``need_landmarks`` (else read when present), bbox likewise.
    """
    root = Path(root)
    if not root.is_dir():
        raise CelebaDataError(f"--archive-dir {str(root)!r} is not a directory")
    attr_path = find_table(root, ATTR_FILE)
    part_path = find_table(root, PARTITION_FILE)
    lm_path = find_table(root, LANDMARKS_FILE, required=False)
    if need_landmarks and lm_path is None:
        raise CelebaDataError(
            f"--use-landmarks needs {root / (LANDMARKS_FILE + '.csv')} (or {LANDMARKS_FILE}.txt), which is missing"
        )
    bbox_path = find_table(root, BBOX_FILE, required=need_bbox)

    ids, raw = read_table(attr_path, ATTRIBUTE_NAMES)
    attributes = _to_int(attr_path, raw, _first_data_line(attr_path), {"-1", "1"}).astype(np.int8)
    index = {image_id: i for i, image_id in enumerate(ids)}  # ids are unique: read_table checks
    files = {ATTR_FILE: attr_path, PARTITION_FILE: part_path}

    p_ids, p_raw = read_table(part_path, ("partition",), txt_header=False)
    p_first = _first_data_line(part_path, txt_header=False)
    partitions = _aligned(part_path, p_ids, _to_int(part_path, p_raw, p_first, {"0", "1", "2"}), index, 1)[:, 0]

    landmarks = bbox = None
    if lm_path is not None:
        l_ids, l_raw = read_table(lm_path, LANDMARK_COLUMNS)
        values = _to_int(lm_path, l_raw, _first_data_line(lm_path))
        landmarks = _aligned(lm_path, l_ids, values, index, len(LANDMARK_COLUMNS)).astype(np.int32)
        files[LANDMARKS_FILE] = lm_path
    if bbox_path is not None:
        b_ids, b_raw = read_table(bbox_path, BBOX_COLUMNS)
        bbox = _aligned(bbox_path, b_ids, _to_int(bbox_path, b_raw, _first_data_line(bbox_path)), index, 4).astype(np.int32)
        files[BBOX_FILE] = bbox_path
    return CelebaArchive(
        root=root,
        image_dir=find_image_dir(root, ids, attr_path),
        image_ids=ids,
        attributes=attributes,
        partitions=partitions.astype(np.int8),
        landmarks=landmarks,
        bbox=bbox,
        files=files,
        checksums={path.name: sha256_file(path) for path in files.values()},
    )

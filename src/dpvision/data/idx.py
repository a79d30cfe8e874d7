"""Strict readers of IDX files (MNIST, Fashion-MNIST), gzipped or not.

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>`` (type 0x08:
unsigned bytes), ``ndim`` big-endian uint32 sizes, then the values in C order.
Images are magic 2051 (``0x00000803``: ubyte, 3 dims [N, rows, cols]), labels
2049 (``0x00000801``: ubyte, 1 dim [N]). A ``.gz`` file is read through gzip
directly, so a read-only folder of ``.gz`` files is enough.

Each reader checks everything before trusting it: the magic, the sizes (and
that they fit in memory), that the payload holds exactly the values the header
announces (no fewer: truncated; no more: trailing bytes), and label ranges.
Any failure is a one-line :class:`~dpvision.data.files.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from dpvision.data.files import DataError, check_total_bytes, open_regular

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
_MAGIC_NAMES = {IMAGES_MAGIC: "images (2051)", LABELS_MAGIC: "labels (2049)"}


def _open(path: Path):
    """A binary stream of the file's IDX bytes, decompressing ``.gz`` on the fly."""
    handle = open_regular(path)
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=handle, mode="rb"), handle
    return handle, handle


READ_CHUNK = 1 << 20  # read in chunks: memory follows the bytes really there, not what a header claims


def _read_exactly(stream, n: int, path: Path, what: str) -> bytearray:
    data = bytearray()
    try:
        while len(data) < n:
            chunk = stream.read(min(READ_CHUNK, n - len(data)))
            if not chunk:
                break
            data += chunk
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; EOFError: gzip cut short
        raise DataError(f"{path}: not a readable gzip file ({err}); delete it (it is re-downloaded) or "
                        "replace it with an intact copy") from None
    if len(data) < n:
        if len(data) == 0 and what == "the magic number":
            raise DataError(f"{path} is empty; an IDX file starts with a 4-byte magic number")
        raise DataError(f"{path} is truncated: it ends {n - len(data)} bytes short of {what} ({len(data)} of {n} "
                        "bytes present)")
    return data


def _read_idx(path: Path, magic: int, ndim: int) -> tuple[tuple[int, ...], bytearray]:
    """``(sizes, payload)`` of an IDX file of unsigned bytes with the given magic number."""
    stream, raw = _open(path)
    with raw, stream:
        found = struct.unpack(">I", _read_exactly(stream, 4, path, "the magic number"))[0]
        if found != magic:
            want = _MAGIC_NAMES[magic]
            other = f" (that is the {_MAGIC_NAMES[found]} magic: images and labels swapped?)" if found in _MAGIC_NAMES \
                else ""
            raise DataError(f"{path}: bad magic number {found} (0x{found:08x}){other}; IDX {want} expected")
        sizes = struct.unpack(f">{ndim}I", _read_exactly(stream, 4 * ndim, path, "the header's sizes"))
        n_bytes = int(np.prod(sizes, dtype=np.int64))
        check_total_bytes(n_bytes, f"{path} (header sizes {list(sizes)})", "the header is corrupt or the file is "
                          "too large to load")
        payload = _read_exactly(stream, n_bytes, path, f"the {'x'.join(map(str, sizes))} values its header announces")
        if _read_exactly_or_less(stream, path):
            raise DataError(f"{path} has bytes beyond the {'x'.join(map(str, sizes))} values its header announces; "
                            "the header sizes are wrong or two files were concatenated")
    return sizes, payload


def _read_exactly_or_less(stream, path: Path) -> bytes:
    try:
        return stream.read(1)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None


def read_idx_images(path: str | os.PathLike, rows: int = 28, cols: int = 28) -> torch.Tensor:
    """uint8 [N, rows, cols] from an IDX images file (N >= 1)."""
    path = Path(path)
    sizes, payload = _read_idx(path, IMAGES_MAGIC, 3)
    if sizes[1:] != (rows, cols):
        raise DataError(f"{path}: images are {sizes[1]}x{sizes[2]}, expected {rows}x{cols}")
    if sizes[0] == 0:
        raise DataError(f"{path} holds no images (its header says 0)")
    array = np.frombuffer(payload, dtype=np.uint8).reshape(sizes)  # a bytearray: writable, no copy
    return torch.from_numpy(array)


def read_idx_labels(path: str | os.PathLike, num_classes: int = 10) -> torch.Tensor:
    """int64 [N] from an IDX labels file; every label in ``0 .. num_classes - 1``."""
    path = Path(path)
    (n,), payload = _read_idx(path, LABELS_MAGIC, 1)
    if n == 0:
        raise DataError(f"{path} holds no labels (its header says 0)")
    labels = np.frombuffer(payload, dtype=np.uint8)
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        raise DataError(f"{path}: label {int(labels[bad[0]])} at index {int(bad[0])} is out of range "
                        f"(labels must be 0..{num_classes - 1}); {bad.size} bad label(s) in all")
    return torch.from_numpy(labels.astype(np.int64))

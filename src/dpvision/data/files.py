"""Errors and careful file access shared by every dataset reader.

Every reader opens its inputs through :func:`open_regular`: the path is checked
with ``stat`` first (so a FIFO, socket or device is refused before it is ever
opened: opening a FIFO for reading blocks until a writer appears), then opened
non-blocking and checked again with ``fstat`` (the path may have changed in
between). Sizes are bounded before anything is read, so no input can make a
reader allocate more than :func:`max_dataset_bytes`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

#: Environment variable overriding :func:`max_dataset_bytes` (bytes, an integer).
MAX_BYTES_ENV = "DPVISION_MAX_DATA_BYTES"
#: Share of physical memory a dataset's uint8 tensors may take: training holds all of them in memory
#: (and may copy them to the device), with the model, optimizer state and float batches on top.
MEMORY_FRACTION = 0.5
_FALLBACK_MEMORY = 8 * 2**30  # when the OS does not say how much memory there is


class DataError(ValueError):
    """Bad or missing dataset input; the one-line message names the file and what would be valid."""


class DataNotFoundError(DataError, FileNotFoundError):
    """The data is not on disk and could not be downloaded (a ``DataError`` and a ``FileNotFoundError``)."""


def max_dataset_bytes() -> int:
    """The most bytes one dataset's tensors may take: ``MEMORY_FRACTION`` of physical memory.

    ``$DPVISION_MAX_DATA_BYTES`` overrides it (tests, shared machines).
    """
    override = os.environ.get(MAX_BYTES_ENV)
    if override:
        try:
            return int(override)
        except ValueError:
            raise DataError(f"${MAX_BYTES_ENV} must be an integer number of bytes, got {override!r}") from None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = _FALLBACK_MEMORY
    return int(total * MEMORY_FRACTION)


def check_total_bytes(n_bytes: int, what: str, fix: str) -> None:
    """Refuse a dataset whose tensors would take more than :func:`max_dataset_bytes`."""
    limit = max_dataset_bytes()
    if n_bytes > limit:
        need, have = _human(n_bytes), _human(limit)
        if need == have:
            need, have = f"{n_bytes:,} bytes", f"{limit:,} bytes"
        raise DataError(f"{what} would take {need} in memory, more than the {have} allowed "
                        f"(half of physical memory, or ${MAX_BYTES_ENV}); {fix}")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def regular_file_stat(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed), or ``DataError`` unless it is a regular file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        broken = " (a broken symlink)" if os.path.islink(path) else ""
        raise DataNotFoundError(f"{shown(path)}: no such file{broken}") from None
    except OSError as err:
        raise DataError(f"cannot read {shown(path)}: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{shown(path)} is {_kind(info.st_mode)}, not a regular file; it was not opened")
    return info


def open_regular(path: str | os.PathLike, max_bytes: int | None = None) -> BinaryIO:
    """Open a regular file for binary reading, never blocking; ``DataError`` otherwise.

    ``max_bytes`` refuses files larger than that before reading them.
    """
    info = regular_file_stat(path)
    if max_bytes is not None and info.st_size > max_bytes:
        raise DataError(f"{shown(path)} is {_human(info.st_size)}, larger than the {_human(max_bytes)} "
                        "such a file can be; it is not a dataset file of this kind")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise DataError(f"cannot open {shown(path)}: {err.strerror or err}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # replaced between stat and open
            raise DataError(f"{shown(path)} is {_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` bytes."""
    with open_regular(path, max_bytes) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the stat
        raise DataError(f"{shown(path)} is larger than the {_human(max_bytes)} such a file can be")
    return data


def find_file(folder: Path, name: str, suffixes: tuple[str, ...] = ("",)) -> Path | None:
    """The first of ``folder/name+suffix`` that exists (as anything but a broken link), else None."""
    for suffix in suffixes:
        path = folder / f"{name}{suffix}"
        if os.path.lexists(path):
            return path
    return None


def shown(path: str | os.PathLike) -> str:
    r"""``path`` as printable text: bytes of a name that is not UTF-8 appear as ``\xNN``.

    Python hands such names over as lone surrogates (``'\udcff'``), which cannot be
    printed, written to a UTF-8 file or encoded; errors name paths through this.

    Example:
        >>> shown("data/train/b\udcff/x.jpg")
        'data/train/b\\xff/x.jpg'
    """
    return os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

"""Guards shared by the three CelebA commands against hostile input and lost work.

* **Image ids are file names, never paths.** :func:`check_image_id` refuses an
  id with a path separator, ``.``/``..``, a drive, a control character (NUL
  included) or nothing at all, so no table row can make a command read or
  write outside the folders it was given.
* **Only regular files are opened.** :func:`file_problem` looks at ``os.stat``
  first: opening a FIFO for reading would block forever.
* **Every output folder carries a marker**, ``.dpvision-output``, saying which
  command wrote it. ``--overwrite`` replaces only a folder with the marker of
  the same command (or an empty one), and never an input, a parent of an
  input or a folder inside one (:func:`check_output_dir`).
* **Nothing is half-written.** :func:`staged_output` builds the output in a
  sibling ``.<name>.tmp-<host>-<pid>-<random>`` and renames it into place; an
  existing output is first moved aside to ``.<name>.old-...``. A run killed
  with SIGKILL leaves such a folder behind; the next run for the same output
  removes it (or puts an output that was moved aside back) once it sees that
  the pid is dead on this host and the folder is recognisably its own.

Example:
    >>> check_image_id("000001.jpg", "list_attr_celeba.csv:2")
    '000001.jpg'
    >>> check_image_id("../x.jpg", "list_attr_celeba.csv:2")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    dpvision.celeba.safety.CelebaDataError: list_attr_celeba.csv:2: image id '../x.jpg' is not a plain file name ...
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

MARKER_FILE = ".dpvision-output"
MARKER_MAX_BYTES = 4096  # a marker is one short JSON line; anything bigger is not ours
#: Output kinds and the command that writes each.
KINDS = {
    "celeba-demo-archive": "dpvision celeba make-demo-archive",
    "celeba-subset": "dpvision celeba build-subset",
    "celeba-preprocessed": "dpvision celeba preprocess",
}
#: Largest image (width x height) any command decodes: CelebA's are 178 x 218; this bounds memory per image.
MAX_IMAGE_PIXELS = 1 << 24
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # pids are only meaningful on one host
_FILE_TYPES = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFCHR: "a character device",
               stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_DIR_MODE = 0o777 & ~_current_umask()  # mkdtemp's 0700 would make finished outputs private


class CelebaDataError(ValueError):
    """Bad or missing CelebA input; the message names the file, flag or field at fault."""


def check_image_id(image_id: str, where: str) -> str:
    """``image_id`` if it is a plain file name, else an error naming ``where`` (file:line) and the id."""
    why = None
    if not image_id:
        why = "it is empty"
    elif "/" in image_id or "\\" in image_id or os.sep in image_id or (os.altsep and os.altsep in image_id):
        why = "it contains a path separator"
    elif image_id in (".", ".."):
        why = "it names a folder"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in image_id):
        why = "it contains a control character"
    elif re.match(r"[A-Za-z]:", image_id):
        why = "it starts with a drive"
    if why is not None:
        raise CelebaDataError(f"{where}: image id {image_id!r} is not a plain file name ({why}); "
                              f"image ids must be file names like 000001.jpg")
    return image_id


def file_problem(path: str | os.PathLike, what: str = "an image") -> str | None:
    """``None`` for a regular file (symlinks followed), else ``"missing"`` or why it cannot be read.

    Raises :class:`CelebaDataError` for something that is not a regular file
    (a FIFO, a folder, a device): it is found with ``os.stat``, never opened.
    ``what`` names the expected file in that message.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as err:
        return f"unreadable: {err.strerror or err}"
    if not stat.S_ISREG(mode):
        kind = _FILE_TYPES.get(stat.S_IFMT(mode), "not a file")
        raise CelebaDataError(f"{path} is not a regular file ({kind}); {what} must be a file")
    return None


def check_image_size(width: int, height: int, path: str | os.PathLike) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise CelebaDataError(f"{path}: image of {width}x{height} pixels is larger than the "
                              f"{MAX_IMAGE_PIXELS} pixels accepted (CelebA's are 178x218)")


def write_marker(folder: str | os.PathLike, kind: str) -> None:
    """Mark ``folder`` as written by ``kind``'s command (same bytes every time: outputs stay reproducible)."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    text = json.dumps({"kind": kind, "written_by": KINDS[kind]}, sort_keys=True) + "\n"
    Path(folder, MARKER_FILE).write_text(text, encoding="utf-8")


def read_marker(folder: str | os.PathLike) -> str | None:
    """The kind recorded in ``folder``'s marker, or ``None`` when there is no valid marker (never blocks)."""
    path = Path(folder, MARKER_FILE)
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MARKER_MAX_BYTES:
            return None
        kind = json.loads(path.read_bytes().decode("utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if kind in KINDS else None


def staging_prefix(output_dir: str | os.PathLike, what: str, pid: int | None = None) -> str:
    """``.<name>.<what>-<host>-<pid>-``: the start of a staging (``tmp``) or moved-aside (``old``) folder's name."""
    return f".{Path(output_dir).name}.{what}-{_HOST}-{os.getpid() if pid is None else pid}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":  # elsewhere os.kill(pid, 0) is no probe: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def remove_stale(output_dir: Path, kind: str) -> None:
    """Remove staging folders of dead runs for ``output_dir``; put a moved-aside output back if it is missing."""
    pattern = re.compile(rf"\.{re.escape(output_dir.name)}\.(tmp|old)-{_HOST}-(\d+)-[A-Za-z0-9_]+")
    try:
        with os.scandir(output_dir.parent) as entries:
            found = [(e.name, pattern.fullmatch(e.name)) for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return  # a parent we cannot list has nothing of ours to clean
    for name, match in found:
        path = output_dir.parent / name
        if match is None or _pid_alive(int(match[2])):
            continue
        try:
            if not (read_marker(path) == kind or _is_empty_dir(path)):
                continue  # not recognisably ours: leave it alone
            if match[1] == "old" and not os.path.lexists(output_dir):
                os.replace(path, output_dir)  # killed between moving the old output aside and renaming the new one in
            else:
                shutil.rmtree(path)
        except OSError:
            continue  # cleaning up must never stop the run


def check_output_dir(output_dir: str | os.PathLike, *, kind: str, flag: str, overwrite: bool,
                     inputs: Sequence[tuple[str, str | os.PathLike]] = ()) -> Path:
    """The absolute output path, or an error if writing there could destroy anything but our own old output.

    ``inputs`` are ``(flag, path)`` pairs: the output may be none of them, no
    parent and no sub-folder of one. An existing output is only accepted if it
    is an empty folder, or with ``overwrite`` a folder marked as ``kind``.
    """
    out = Path(os.path.abspath(output_dir))
    real = out.resolve()
    for in_flag, in_path in inputs:
        source = Path(in_path).resolve()
        if real == source or source in real.parents or real in source.parents:
            raise CelebaDataError(f"{flag} {str(output_dir)!r} overlaps {in_flag} {str(in_path)!r}; "
                                  f"an input, its parents and its sub-folders are never written to")
    ancestor = out.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CelebaDataError(f"cannot write {flag} {str(output_dir)!r}: {ancestor} is not a directory")
    if os.path.lexists(out):
        _check_replaceable(out, str(output_dir), kind=kind, flag=flag, overwrite=overwrite)
    return out


def _check_replaceable(out: Path, shown: str, *, kind: str, flag: str, overwrite: bool) -> None:
    is_dir = out.is_dir() and not out.is_symlink()
    if is_dir and _is_empty_dir(out):
        return  # nothing to lose
    if not overwrite:
        raise CelebaDataError(f"{flag} {shown!r} already exists: pass --overwrite to replace it, or choose another {flag}")
    found = read_marker(out) if is_dir else None
    if found == kind:
        return
    what = (f"holds a {found} (written by {KINDS[found]})" if found else
            f"was not written by dpvision (it has no {MARKER_FILE} marker)")
    raise CelebaDataError(f"{flag} {shown!r} {what}; --overwrite only replaces a {kind} folder, "
                          f"so remove it yourself or choose another {flag}")


def prepare_output(output_dir: str | os.PathLike, *, kind: str, flag: str, overwrite: bool,
                   inputs: Sequence[tuple[str, str | os.PathLike]] = ()) -> Path:
    """:func:`remove_stale` leftovers of killed runs, then :func:`check_output_dir`."""
    remove_stale(Path(os.path.abspath(output_dir)), kind)
    return check_output_dir(output_dir, kind=kind, flag=flag, overwrite=overwrite, inputs=inputs)


@contextmanager
def staged_output(output_dir: str | os.PathLike, *, kind: str, flag: str, overwrite: bool,
                  inputs: Sequence[tuple[str, str | os.PathLike]] = ()) -> Iterator[Path]:
    """Yield a marked, empty staging folder; on success it replaces ``output_dir`` in one rename.

    On any exception (Ctrl-C included) the staging folder is removed and an
    existing output is left as it was. An ``OSError`` (full disk, read-only
    folder) becomes one :class:`CelebaDataError` line naming ``flag`` and the output.
    """
    shown = str(output_dir)
    out = prepare_output(output_dir, kind=kind, flag=flag, overwrite=overwrite, inputs=inputs)
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(out, "tmp"), dir=out.parent))
        os.chmod(tmp, _DIR_MODE)
        write_marker(tmp, kind)
        yield tmp
        _commit(tmp, out, shown, kind=kind, flag=flag, overwrite=overwrite)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            name = str(err.filename or "")
            if name and tmp is not None:
                name = name.replace(str(tmp), str(out))  # the path as it would have been, not the staging name
            where = f" ({name})" if name else ""
            raise CelebaDataError(f"cannot write {flag} {shown!r}: {err.strerror or err}{where}") from None
        raise


def _commit(tmp: Path, out: Path, shown: str, *, kind: str, flag: str, overwrite: bool) -> None:
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    _check_replaceable(out, shown, kind=kind, flag=flag, overwrite=overwrite)  # again: it may be new since the start
    aside = out.parent / f"{staging_prefix(out, 'old')}{secrets.token_hex(4)}"
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def interruptible_map(fn: Callable, items: Sequence, *, threads: int, desc: str, disable: bool | None) -> list:
    """``[fn(x) for x in items]`` on ``threads`` threads with a progress bar.

    On an error or Ctrl-C the queued calls are cancelled, so the command stops
    after the few running ones instead of working through the whole list.
    """
    pool = ThreadPoolExecutor(threads)
    try:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, unit="img", disable=disable))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

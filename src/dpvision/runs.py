"""Run folders: one directory per training run, every file written atomically.

Layout of ``<runs-dir>/<job>/<run-name>/``::

    config.yaml     the resolved configuration (what actually ran)
    metrics.csv     append-only, one row per epoch
    summary.json    final numbers, library versions, device, wall time
    model.pt        final (or best) model weights

Every write goes to a temporary file in the same directory and is then renamed
over the target, so a crash never leaves a half-written file behind; a write that
fails (a full disk) raises an ``OSError`` naming the file it was writing. A new
run folder that a failed write ends before its first completed epoch is removed
(:meth:`RunDir.removed_on_write_failure`); an existing one is never touched.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    An ``OSError`` (``ENOSPC`` from ``write``, which names no file) is raised again
    with ``path`` as its filename; the temporary file is removed and ``path`` keeps
    its old content, if it had one.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make results unreadable to others
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename != str(path):  # the file being written, not the temporary one
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` as UTF-8; text holding a file name that is not UTF-8 is an ``OSError`` (EILSEQ) naming ``path``."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate: how Python hands over a name that is not UTF-8
        near = text[max(0, err.start - 60):err.end + 20]  # repr: the byte 0xff shows as \udcff
        raise OSError(errno.EILSEQ, f"cannot write it as UTF-8 text: it would hold a file or folder name that is "
                                    f"not valid UTF-8 (near {near!r}); rename that", str(path)) from None
    atomic_write_bytes(path, data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Strict JSON (non-finite floats become the strings "inf", "-inf", "nan")."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=True, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if obj != obj else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def csv_text(fieldnames: list[str], rows: Iterable[Mapping[str, Any]]) -> str:
    """Rows as CSV text with ``\\n`` line endings (the same bytes on every OS)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row[key] for key in fieldnames})
    return out.getvalue()


def check_writable_dir(path: str | os.PathLike, *, flag: str) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise ``ValueError`` naming ``flag``."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"{flag} {str(path)!r} is not a writable directory ({err.strerror or err})") from None
    return path


def library_versions() -> dict[str, str]:
    import opacus
    import torchvision

    import dpvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "opacus": opacus.__version__,
        "dpvision": dpvision.__version__,
    }


def _json_default(obj: Any) -> Any:
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.device):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


class RunDir:
    """A run folder with an append-only metrics CSV.

    Example:
        >>> run = RunDir.create("runs", "mnist", "demo")       # doctest: +SKIP
        >>> run.write_config({"lr": 0.1})                        # doctest: +SKIP
        >>> run.append_metrics({"epoch": 1, "test_accuracy": 0.9})  # doctest: +SKIP
    """

    CONFIG = "config.yaml"
    METRICS = "metrics.csv"
    SUMMARY = "summary.json"
    MODEL = "model.pt"

    def __init__(self, path: str | os.PathLike, metric_fields: list[str] | None = None) -> None:
        self.path = Path(path)
        self.metric_fields = metric_fields
        self.created = False  # made by this process (``create``): removable while it holds no completed epoch
        self.completed_epoch = False  # a metrics row was written: the folder holds a checkpointed epoch

    @classmethod
    def create(cls, runs_dir: str | os.PathLike, job: str, run_name: str | None = None,
               metric_fields: list[str] | None = None) -> "RunDir":
        """A new, empty run folder ``<runs_dir>/<job>/<run_name>`` (a timestamp when no name is given)."""
        base = check_writable_dir(Path(runs_dir) / job, flag="--runs-dir")
        name = run_name or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = base / name
        suffix = 1
        while path.exists():  # never overwrite an earlier run
            suffix += 1
            path = base / f"{name}-{suffix}"
        path.mkdir(parents=True)
        run = cls(path, metric_fields)
        run.created = True
        return run

    @contextlib.contextmanager
    def removed_on_write_failure(self):
        """On an ``OSError`` (a full disk), remove this folder if it is new and holds no completed epoch.

        Such a folder has nothing ``--resume`` could use and may hold some of a run's files
        (config.yaml, checkpoint.pt, metrics.csv, .lock); the error, naming the file that
        failed, goes on with a note that the folder was removed. A folder this process did
        not create (``--resume``), or one with a completed epoch, is left as it is. Other
        exceptions (Ctrl-C, a crash) keep the folder: ``--resume`` continues it.
        """
        try:
            yield self
        except OSError as err:
            if not self.created or self.completed_epoch:
                raise
            self.unlock()
            shutil.rmtree(self.path, ignore_errors=True)
            note = f"{err.strerror or err} (removed the new run folder {self.path}: no epoch was completed)"
            raise OSError(err.errno, note, err.filename) from err

    LOCK = ".lock"

    def lock(self) -> None:
        """Hold an exclusive lock on this folder until :meth:`unlock` (or the process ends).

        Two processes appending to one run (two ``--resume`` of the same folder) would
        write every epoch twice; the second one is refused instead. ``.lock`` exists only
        while a process holds it (:meth:`unlock` removes it; a killed process leaves the
        file but not the lock).
        """
        import fcntl  # lazy: POSIX only, and only a training run takes the lock

        path = self.path / self.LOCK
        while True:
            handle = open(path, "a+")  # noqa: SIM115 (held open: the lock lives with it)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise ValueError(f"run folder {self.path} is in use by {holder}; wait for it to finish") from None
            # The holder may have removed the file between our open and our lock: then retry on the new one.
            try:
                if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        """Release the lock and remove ``.lock`` (removed first, while still held, so no one locks a stale file)."""
        handle = getattr(self, "_lock_handle", None)
        if handle is not None:
            (self.path / self.LOCK).unlink(missing_ok=True)
            handle.close()  # closing the file releases the lock
            self._lock_handle = None

    def write_config(self, config: Any) -> None:
        """Write config.yaml; if that fails in a new folder, the folder is removed (nothing in it is usable)."""
        data = asdict(config) if is_dataclass(config) else dict(config)
        with self.removed_on_write_failure():
            atomic_write_text(self.path / self.CONFIG, yaml.safe_dump(_plain(data), sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        with open(self.path / self.CONFIG) as handle:
            return yaml.safe_load(handle)

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Add one row; earlier rows are never rewritten, the file is replaced atomically."""
        fields = self.metric_fields or list(row)
        self.metric_fields = fields
        unknown = set(row) - set(fields)
        if unknown:
            raise ValueError(f"metrics row has unknown columns {sorted(unknown)}; expected {fields}")
        path = self.path / self.METRICS
        previous = path.read_text() if path.exists() else csv_text(fields, [])
        line = csv_text(fields, [{k: _fmt(row.get(k, "")) for k in fields}]).split("\n", 1)[1]
        atomic_write_text(path, previous + line)
        self.completed_epoch = True  # the job writes a row only after the epoch's checkpoint

    def rewrite_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace metrics.csv with exactly ``rows`` (a resumed run drops epochs it will replay)."""
        fields = self.metric_fields or []
        rows = list(rows)
        if not fields and rows:
            fields = self.metric_fields = list(rows[0])
        atomic_write_text(self.path / self.METRICS, csv_text(fields, [{k: _fmt(r.get(k, "")) for k in fields} for r in rows]))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.path / self.SUMMARY, dict(summary))

    def save_model(self, model: torch.nn.Module, name: str | None = None) -> Path:
        path = self.path / (name or self.MODEL)
        atomic_torch_save(model.state_dict(), path)
        return path


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    return value


def _plain(obj: Any) -> Any:
    """Config values as YAML-safe plain types."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (Path, torch.device)):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    return obj

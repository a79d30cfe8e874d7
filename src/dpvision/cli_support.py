"""Small command-line helpers shared by every job; importing this module does not import torch.

Bad input is reported in one line (``prog: error: ...``) with exit status 2, and
warnings as ``warning: ...``, so that scripts and tests can rely on the format.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def given_flags(parser: argparse.ArgumentParser, argv) -> list[str]:
    """The options actually typed in ``argv`` (abbreviations resolved), by their longest name.

    Parses ``argv`` again with every default suppressed: what is left was typed.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--lr", type=float, default=0.1); _ = p.add_argument("--quiet", action="store_true")
        >>> given_flags(p, ["--qui", "--lr", "0.2"])
        ['--quiet', '--lr']
    """
    import copy

    probe = copy.deepcopy(parser)
    names = {}
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
        if action.option_strings:
            names[action.dest] = max(action.option_strings, key=len)
    probe.error = lambda message: None  # the real parser has already accepted argv
    namespace, _ = probe.parse_known_args(list(argv))
    return [names[dest] for dest in vars(namespace) if dest in names]  # set while parsing: argv order


def parse_delta(text: str) -> float | str:
    """``--delta``: a number, or ``auto`` for 1 / (10 N).

    Example:
        >>> parse_delta("1e-5"), parse_delta("AUTO")
        (1e-05, 'auto')
    """
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"--delta must be a number in (0, 1) or 'auto', got {text!r}") from None


def rename_fields(message: str, names: dict[str, str]) -> str:
    """``message`` with config fields replaced by a front-end's flag names (longest field first).

    Example:
        >>> rename_fields("dp.noise_multiplier must be >= 0", {"dp.noise_multiplier": "--sigma"})
        '--sigma must be >= 0'
    """
    for field_name, flag in sorted(names.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(field_name, flag)
    return message


def one_line_warnings() -> None:
    """Print warnings as ``warning: <message>`` (no file name, line number or source line)."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def resolve_device(name: str):
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device must be cpu or auto on this machine (no CUDA device is available), "
                         "got 'cuda'")
    return torch.device(name)


def check_can_create_dir(path: str | os.PathLike, flag: str) -> None:
    """Raise ``ValueError`` naming ``flag`` if ``path`` could not be created or written; leave nothing behind.

    Tried for real (folders created, a probe file written, then all removed): permission bits
    say nothing for root, and places like ``/proc`` refuse files whatever the bits say.
    """
    import tempfile

    path = Path(path).absolute()
    missing = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a directory")
        for folder in reversed(missing):
            folder.mkdir()
        fd, name = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise ValueError(f"{flag} must be a writable directory, got {str(path)!r} "
                         f"({err.strerror or err})") from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass

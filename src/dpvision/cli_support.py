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


def one_line_warnings() -> None:
    """Print warnings as ``warning: <message>`` (no file name, line number or source line)."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def resolve_device(name: str):
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_can_create_dir(path: str | os.PathLike, flag: str) -> None:
    """Raise ``ValueError`` naming ``flag`` if ``path`` could not be created or written; create nothing."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} must be a writable directory, got {str(path)!r} ({probe} is not writable)")

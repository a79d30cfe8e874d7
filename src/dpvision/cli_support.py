"""Small command-line helpers shared by every job; importing this module does not import torch.

Bad input is reported in one line (``prog: error: ...``) with exit status 2, and
warnings as ``warning: ...``, so that scripts and tests can rely on the format.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import shlex
import tempfile
import warnings
from pathlib import Path
from typing import Callable


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr and exit status 2.

    An unknown flag is refused by the (sub)command it was given to, under that command's
    name, with the nearest valid flag:

        >>> parser = OneLineParser(prog="dpvision train")
        >>> _ = parser.add_argument("--epochs", type=int)
        >>> unrecognized(parser, ["--epcohs", "1"])
        'unrecognized argument --epcohs (did you mean --epochs?)'
    """

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse hands a subcommand's leftovers up to the top parser, which names itself
        # ("dpvision: error"); refusing them here names the command that was given them.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized(self, extras))
        return namespace, extras


def unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The error for arguments ``parser`` does not know, suggesting the closest flag for a misspelt one."""
    flags = [extra for extra in extras if extra.startswith("-")]
    if not flags:
        return f"unrecognized arguments: {shlex.join(extras)}"
    typed = flags[0].split("=", 1)[0]
    known = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    close = difflib.get_close_matches(typed, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unrecognized argument {typed}{hint}"


def given_flags(parser: argparse.ArgumentParser, argv) -> list[str]:
    """The options actually typed in ``argv`` (abbreviations resolved), by their longest name.

    Parses ``argv`` again with every default suppressed: what is left was typed.

    Example:
        >>> p = argparse.ArgumentParser()
        >>> _ = p.add_argument("--lr", type=float, default=0.1); _ = p.add_argument("--quiet", action="store_true")
        >>> given_flags(p, ["--qui", "--lr", "0.2"])
        ['--quiet', '--lr']
    """
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


def one_line_warnings(translate: Callable[[str], str] = str) -> None:
    """Print warnings as ``warning: <message>`` (no file name, line number or source line).

    ``translate`` renders the config fields a warning names in a front-end's flags.
    """
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {translate(str(message))}\n"


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

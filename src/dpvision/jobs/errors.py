"""How every job ends when it cannot go on: one line, a known exit status, no traceback.

* bad input (a flag, a recipe, a data file, a checkpoint of another run): ``prog: error: ...``, exit 2;
* a full disk or an unwritable path found while running: the path and the reason, exit 2
  (everything already written was written atomically, so nothing is half-written);
* Ctrl-C: ``prog: interrupted`` naming the run folder to ``--resume``, exit 130; the last checkpoint stays
  usable;
* another rank of a distributed run failed: the line names it, exit 1.

Example:
    >>> import argparse
    >>> def bad():
    ...     raise ValueError("--lr must be >= 0, got -1.0")
    >>> run_guarded(argparse.ArgumentParser(prog="demo"), bad, stream=sys.stdout)
    demo: error: --lr must be >= 0, got -1.0
    2
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Callable

from dpvision.cli_support import given_flags, one_line_warnings
from dpvision.engines.distributed import RankFailureError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_RANK_FAILED = 1  # another process of a distributed run failed: not bad input


def one_line(err: BaseException) -> str:
    """The first line of an error's message, with the path for an ``OSError``."""
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def run_guarded(parser: argparse.ArgumentParser, fn: Callable[[], object], *,
                translate: Callable[[str], str] | None = None, stream=None) -> int:
    """Run ``fn()``; exit status 0, or print one line and return 2 (bad input) or 130 (Ctrl-C)."""
    stream = stream or sys.stderr
    try:
        fn()
    except KeyboardInterrupt as interrupt:
        folder = getattr(interrupt, "run_dir", None)  # set by dpvision.jobs.train.run once its folder exists
        where = (f"--resume {shlex.quote(str(folder))} continues from the last completed epoch, if one was"
                 if folder else "before the run folder was made: nothing to resume")
        print(f"{parser.prog}: interrupted ({where})", file=stream, flush=True)
        return EXIT_INTERRUPTED
    except RuntimeError as err:
        if not isinstance(err, RankFailureError):
            raise
        print(f"{parser.prog}: error: {one_line(err)}", file=stream, flush=True)
        return EXIT_RANK_FAILED
    except (ValueError, OSError) as err:  # DataError, CheckpointError and friends are ValueErrors
        message = one_line(err)
        print(f"{parser.prog}: error: {translate(message) if translate else message}", file=stream, flush=True)
        return EXIT_BAD_INPUT
    return 0


def run_front_end(parser: argparse.ArgumentParser, args: argparse.Namespace, given: list[str],
                  run: Callable[[argparse.Namespace, list[str]], int]) -> int:
    """A seed front-end's parsed flags run: warnings and errors in that front-end's own flag names."""
    one_line_warnings(args.flag_map.translate)
    return run_guarded(parser, lambda: run(args, given), translate=args.flag_map.translate)


def front_end_main(parser: argparse.ArgumentParser, argv, run_parsed) -> int:
    """``python mnist.py [flags]`` and the like: parse ``argv`` (default ``sys.argv[1:]``), then ``run_parsed``."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    return run_parsed(parser, parser.parse_args(argv), given_flags(parser, argv))

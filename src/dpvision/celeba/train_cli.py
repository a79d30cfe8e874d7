"""Command line of the CelebA trainer: ``python scripts/celeba_train.py`` and ``dpvision celeba train``.

Flags map one to one onto :class:`~dpvision.celeba.train.CelebaTrainConfig`; bad input exits with
status 2 and one ``error:`` line naming the flag, before anything is written (and before torch is
imported, so a typo is reported at once).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dpvision.celeba.train import (
    ACCOUNTANT_NAMES, DEFAULT_SIGMA, DEVICES, ENGINE_NAMES, MODES, OPTIMIZERS, RESUME_FLAGS, CelebaTrainConfig,
    load_resume_config, run, validate,
)  # fmt: skip
from dpvision.cli_support import OneLineParser, one_line_warnings


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``celeba_train.py``. Defaults are ``None`` here (so a given flag can be told from a
    default one); :func:`config_from_args` applies the real defaults of :class:`CelebaTrainConfig`."""
    add = parser.add_argument
    add("--data", default=None, metavar="DIR", help="preprocessed folder (train.pt, val.pt, test.pt, stats.json)")
    add("--mode", default=None, choices=MODES, help="baseline (no DP) or dp (DP-SGD) (default: dp)")
    add("--epochs", type=int, default=None, help="training epochs (default: 10)")
    add("--batch-size", type=int, default=None, help="batch size; under DP the expected (Poisson) batch size "
                                                      "(default: 256)")
    add("--eval-batch-size", type=int, default=None, help="batch size for validation and test (default: 512)")
    add("--lr", type=float, default=None, help="learning rate (default: 0.05 for baseline, 0.1 for dp)")
    add("--optimizer", default=None, choices=OPTIMIZERS, help="sgd (with --momentum) or adam (default: sgd)")
    add("--momentum", type=float, default=None, help="SGD momentum (default: 0.9)")
    add("--sigma", type=float, default=None, help=f"noise multiplier σ under DP (default: {DEFAULT_SIGMA})")
    add("--target-epsilon", type=float, default=None,
        help="calibrate σ so that the whole run ends at this ε (excludes --sigma)")
    add("--max-grad-norm", type=float, default=None, help="per-example clipping norm C (default: 1.0)")
    add("--delta", default=None, help="δ, a number or 'auto' for 1/(10 N_train) (default: auto)")
    add("--accountant", default=None, choices=ACCOUNTANT_NAMES,
        help="accountant of the reported, calibrated and budgeted ε; metrics.csv has all three (default: rdp)")
    add("--max-epsilon", type=float, default=None,
        help="privacy budget: stop before the first step that would take ε above it (default: none)")
    add("--resume", default=None, metavar="RUN_DIR",
        help="continue the interrupted run in RUN_DIR with its saved settings (only --data, --device and "
             "--quiet may be given again)")
    add("--seed", type=int, default=None, help="seed of initialisation, sampling, data order and noise (default: 0)")
    add("--device", default=None, choices=DEVICES, help="cpu, cuda or auto (default: auto)")
    add("--engine", default=None, choices=ENGINE_NAMES,
        help="fast (device-resident data; falls back to opacus when unsupported) or opacus (default: fast)")
    add("--width", type=int, default=None, help="channels of CelebaCNN's first block, a multiple of 8 (default: 16)")
    add("--runs-dir", default=None, help="runs go to <runs-dir>/celeba_<mode>/<run-name>/ (default: runs)")
    add("--run-name", default=None, help="run folder name (default: from the settings; -2, -3... if taken)")
    add("--quiet", action="store_true", default=None, help="no progress bars or per-epoch lines")
    return parser


_FLAG_TO_FIELD = {
    "--data": "data", "--mode": "mode", "--epochs": "epochs", "--batch-size": "batch_size",
    "--eval-batch-size": "eval_batch_size", "--lr": "lr", "--optimizer": "optimizer", "--momentum": "momentum",
    "--sigma": "sigma", "--target-epsilon": "target_epsilon", "--max-grad-norm": "max_grad_norm",
    "--delta": "delta", "--accountant": "accountant", "--max-epsilon": "max_epsilon", "--seed": "seed",
    "--device": "device", "--engine": "engine", "--width": "width", "--runs-dir": "runs_dir",
    "--run-name": "run_name", "--quiet": "quiet",
}


def given_flags(args: argparse.Namespace) -> list[str]:
    """The flags present on the command line (every parser default is None)."""
    flags = [flag for flag, name in _FLAG_TO_FIELD.items() if getattr(args, name, None) is not None]
    return (["--resume"] if args.resume is not None else []) + flags


def config_from_args(args: argparse.Namespace) -> CelebaTrainConfig:
    """A :class:`CelebaTrainConfig` from parsed flags (``ValueError`` naming the flag on bad input)."""
    values = {name: getattr(args, name) for name in _FLAG_TO_FIELD.values() if getattr(args, name) is not None}
    if values.get("mode", "dp") == "baseline" and args.max_grad_norm is not None:
        raise ValueError("--max-grad-norm needs --mode dp (the baseline does not clip)")
    if args.data is None:
        raise ValueError("--data is required: a folder made by celeba_preprocess.py (or give --resume RUN_DIR)")
    return CelebaTrainConfig(**values)


def run_from_args(args: argparse.Namespace) -> tuple[int, str | None]:
    """Validate, train; ``(exit status, error line or None)``. Nothing is written when validation fails."""
    from dpvision.checkpoint import CheckpointError

    try:
        if args.resume is not None:
            from dpvision.jobs.loop import check_resume_flags

            given = given_flags(args)
            check_resume_flags(given, RESUME_FLAGS)
            overrides = {name: getattr(args, name) for name in ("data", "device", "quiet")
                         if getattr(args, name) is not None}
            config, _ = load_resume_config(args.resume, **overrides)
        else:
            config = config_from_args(args)
            validate(config)
    except (ValueError, OSError) as err:
        return 2, str(err).splitlines()[0] if str(err) else type(err).__name__
    try:
        run(config, resume=args.resume)
    except CheckpointError as err:
        return 2, str(err)
    return 0, None


def train_main(argv: Sequence[str] | None = None, prog: str = "celeba_train.py") -> int:
    """``python scripts/celeba_train.py [flags]``: exit 0, or 2 with one ``error:`` line naming the flag."""
    one_line_warnings()
    parser = add_train_arguments(OneLineParser(
        prog=prog, description="Train the small CelebA CNN on a preprocessed folder: baseline or DP-SGD."))
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    status, error = run_from_args(args)
    if error is not None:
        parser.exit(status, f"{parser.prog}: error: {error}\n")
    return status


def add_train_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` to a subparsers object (e.g. the one of ``dpvision celeba``).

    The parsed namespace carries ``func(args) -> int`` like the other ``celeba``
    sub-commands; bad input prints one ``error:`` line and returns 2.

    Example:
        >>> parser = argparse.ArgumentParser(prog="dpvision celeba")
        >>> _ = add_train_subcommand(parser.add_subparsers(dest="celeba_command"))
        >>> args = parser.parse_args(["train", "--data", "pre", "--mode", "baseline"])
        >>> args.mode, args.func.__name__
        ('baseline', 'run_train_command')
    """
    parser = subparsers.add_parser("train", help="train the CelebA CNN: baseline or DP-SGD")
    add_train_arguments(parser)
    parser.set_defaults(func=run_train_command)
    return parser


def run_train_command(args: argparse.Namespace) -> int:
    one_line_warnings()
    status, error = run_from_args(args)
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
    return status

"""``python scripts/celeba_train.py`` and ``dpvision celeba train``: the CelebA trainer's flags on the one job.

The trainer is the job with ``data.dataset: celeba`` (a folder made by ``celeba_preprocess.py``),
``model.name: celeba_cnn`` and ``run.select: best_val`` (the test set judges the weights of the
best validation epoch, ``model_best.pt``). ``--mode baseline`` is the same config deactivated.
Run folders go to ``<runs-dir>/celeba_<mode>/<run-name>/``; ``summary.json`` names the groups
``test_accuracy_per_stratum`` (the interocular-distance strata of the subset).

Defaults (chosen on the demo archive, see the README): 10 epochs, expected batch 256, SGD with
momentum 0.9 at lr 0.05 (baseline) or 0.1 (DP: clipped gradients are smaller), CelebaCNN of
width 16, C = 1, σ = 1 unless ``--target-epsilon`` is given, δ = 1/(10 N) ("auto").
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dpvision.cli_support import OneLineParser, given_flags, one_line_warnings, parse_delta, rename_fields

MODES = ("baseline", "dp")
DEFAULT_LR = {"baseline": 0.05, "dp": 0.1}  # measured on the 20,000-image demo archive (README)
DP_ONLY_FLAGS = ("--sigma", "--target-epsilon", "--max-epsilon", "--max-grad-norm")
RESUME_FLAGS = ("--resume", "--data", "--device", "--quiet")
# Config fields as this trainer's flags name them, for error messages.
FLAG_NAMES = {"data.root": "--data", "optim.epochs": "--epochs", "optim.batch_size": "--batch-size",
              "optim.eval_batch_size": "--eval-batch-size", "optim.lr": "--lr", "optim.name": "--optimizer",
              "optim.momentum": "--momentum", "dp.noise_multiplier": "--sigma",
              "dp.target_epsilon": "--target-epsilon", "dp.max_grad_norm": "--max-grad-norm", "dp.delta": "--delta",
              "dp.accountant": "--accountant", "dp.max_epsilon": "--max-epsilon", "run.seed": "--seed",
              "run.device": "--device", "run.engine": "--engine", "model.width": "--width",
              "run.runs_dir": "--runs-dir", "run.run_name": "--run-name"}


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    add("--data", default=None, metavar="DIR", help="preprocessed folder (train.pt, val.pt, test.pt, stats.json)")
    add("--mode", default="dp", choices=MODES, help="baseline (no DP) or dp (DP-SGD) (default: dp)")
    add("--epochs", type=int, default=10, help="training epochs (default: 10)")
    add("--batch-size", type=int, default=256, help="batch size; under DP the expected batch size (default: 256)")
    add("--eval-batch-size", type=int, default=512, help="batch size for validation and test (default: 512)")
    add("--lr", type=float, default=None, help="learning rate (default: 0.05 for baseline, 0.1 for dp)")
    add("--optimizer", default="sgd", help="sgd (with --momentum) or adam (default: sgd)")
    add("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    add("--sigma", type=float, default=None, help="noise multiplier σ under DP (default: 1.0)")
    add("--target-epsilon", type=float, default=None,
        help="calibrate σ so that the whole run ends at this ε (excludes --sigma)")
    add("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C (default: 1.0)")
    add("--delta", default="auto", help="δ, a number or 'auto' for 1/(10 N_train) (default: auto)")
    add("--accountant", default="rdp", help="accountant of the reported, calibrated and budgeted ε: rdp, prv or "
        "pld; metrics.csv has all three (default: rdp)")
    add("--max-epsilon", type=float, default=None,
        help="privacy budget: stop before the first step that would take ε above it (default: none)")
    add("--resume", default=None, metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR with its saved "
        "settings (only --data, --device and --quiet may be given again)")
    add("--seed", type=int, default=0, help="seed of initialisation, sampling, data order and noise (default: 0)")
    add("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    add("--engine", default="fast", help="fast (device-resident data; falls back to opacus when unsupported) or "
        "opacus (default: fast)")
    add("--width", type=int, default=16, help="channels of CelebaCNN's first block, a multiple of 8 (default: 16)")
    add("--runs-dir", default="runs", help="runs go to <runs-dir>/celeba_<mode>/<run-name>/ (default: runs)")
    add("--run-name", default=None, help="run folder name (default: from the settings; -2, -3... if taken)")
    add("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    return parser


def translate(message: str) -> str:
    return rename_fields(message, FLAG_NAMES)


def config_from_args(args: argparse.Namespace, given: Sequence[str]):
    """The job's config for these flags (``ValueError`` naming the flag)."""
    from dpvision.jobs.config import TrainConfig

    if args.data is None:
        raise ValueError("--data is required: a folder made by celeba_preprocess.py (or give --resume RUN_DIR)")
    dp_flags = [flag for flag in DP_ONLY_FLAGS if flag in given]
    if args.mode == "baseline" and dp_flags:
        raise ValueError(f"{dp_flags[0]} needs --mode dp (the baseline adds no noise and spends no privacy)")
    dp = {"enabled": args.mode == "dp", "max_grad_norm": args.max_grad_norm, "delta": parse_delta(args.delta),
          "accountant": args.accountant, "max_epsilon": args.max_epsilon, "target_epsilon": args.target_epsilon,
          "noise_multiplier": args.sigma}
    config = TrainConfig.from_dict({
        "data": {"dataset": "celeba", "root": args.data},
        "model": {"name": "celeba_cnn", "width": args.width},
        "optim": {"name": args.optimizer, "lr": DEFAULT_LR[args.mode] if args.lr is None else args.lr,
                  "momentum": args.momentum if args.optimizer == "sgd" else 0.0, "epochs": args.epochs,
                  "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size},
        "dp": dp,
        "run": {"engine": args.engine, "device": args.device, "seed": args.seed, "runs_dir": args.runs_dir,
                "run_name": args.run_name, "quiet": args.quiet, "select": "best_val", "test_every_epoch": False},
    })
    return config if args.mode == "dp" else config.deactivated()


def _run(args: argparse.Namespace, given: list[str]) -> dict:
    from dpvision.jobs.loop import check_resume_flags, resume_overrides
    from dpvision.jobs.train import run

    if args.resume is not None:
        check_resume_flags(given, RESUME_FLAGS)
        summary = run(resume=args.resume, overrides=resume_overrides(args, given, {
            "--data": ("data.root", "data"), "--device": ("run.device", "device"), "--quiet": ("run.quiet", "quiet")}))
    else:
        summary = run(config_from_args(args, given), group=f"celeba_{args.mode}")
    return _with_strata(summary)


def _with_strata(summary: dict) -> dict:
    """The CelebA names of the generic summary fields: ``mode`` and the ``*_per_stratum`` groups."""
    from pathlib import Path

    from dpvision.runs import RunDir

    summary = {**summary, "mode": "dp" if summary["dp"] else "baseline",
               "test_accuracy_per_stratum": summary["test_accuracy_per_group"],
               "test_count_per_stratum": summary["test_count_per_group"]}
    RunDir(Path(summary["run_dir"])).write_summary(summary)
    return summary


def main(argv: Sequence[str] | None = None, prog: str = "celeba_train.py") -> int:
    """``python scripts/celeba_train.py [flags]``: exit 0, or 2 with one ``error:`` line naming the flag."""
    from dpvision.jobs.errors import run_guarded

    one_line_warnings()
    parser = add_train_arguments(OneLineParser(
        prog=prog, description="Train the small CelebA CNN on a preprocessed folder: baseline or DP-SGD."))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    return run_guarded(parser, lambda: _run(args, given), translate=translate)


def add_train_subcommand(subparsers) -> argparse.ArgumentParser:
    """``dpvision celeba train``: the same flags and code as ``scripts/celeba_train.py``."""
    parser = subparsers.add_parser("train", help="train the CelebA CNN: baseline or DP-SGD")
    add_train_arguments(parser)
    parser.set_defaults(func=lambda args, argv=None: main(argv if argv is not None else sys.argv[3:],
                                                           prog="dpvision celeba train"))
    return parser

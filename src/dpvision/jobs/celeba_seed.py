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
from typing import Sequence

from dpvision.cli_support import OneLineParser
from dpvision.jobs.config import TrainConfig
from dpvision.jobs import train as train_job  # train_job.run: looked up at call time (tests wrap it)
from dpvision.jobs.errors import front_end_main, run_front_end
from dpvision.jobs.flags import FlagMap
from dpvision.jobs.loop import check_resume_flags

MODES = ("baseline", "dp")
DEFAULT_LR = {"baseline": 0.05, "dp": 0.1}  # measured on the 20,000-image demo archive (README)
DP_ONLY_FIELDS = ("dp.noise_multiplier", "dp.target_epsilon", "dp.max_epsilon", "dp.max_grad_norm")
RESUME_FIELDS = ("data.root", "run.device", "run.quiet")  # with --resume, the only flags a resume takes
SPELLINGS = {"data.root": "--data"}  # the trainer's spelling of config fields (the rest as in dpvision train)


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    flags = FlagMap(SPELLINGS)
    add, field = parser.add_argument, lambda *a, **k: flags.add(parser, *a, **k)
    parser.set_defaults(flag_map=flags)
    field("data.root", default=None, metavar="DIR",
          help="preprocessed folder (train.pt, val.pt, test.pt, stats.json)")
    add("--mode", default="dp", choices=MODES, help="baseline (no DP) or dp (DP-SGD) (default: dp)")
    field("optim.epochs", default=10, help="training epochs (default: 10)")
    field("optim.batch_size", default=256, help="batch size; under DP the expected batch size (default: 256)")
    field("optim.eval_batch_size", default=512, help="batch size for validation and test (default: 512)")
    field("optim.lr", default=None, help="learning rate (default: 0.05 for baseline, 0.1 for dp)")
    field("optim.name", default="sgd", help="sgd (with --momentum) or adam (default: sgd)")
    field("optim.momentum", default=0.9, help="SGD momentum (default: 0.9)")
    field("dp.noise_multiplier", default=None, help="noise multiplier σ under DP (default: 1.0)")
    field("dp.target_epsilon", default=None,
          help="calibrate σ so that the whole run ends at this ε (excludes --sigma)")
    field("dp.max_grad_norm", default=1.0, help="per-example clipping norm C (default: 1.0)")
    field("dp.delta", default="auto", help="δ, a number below 1/N_train or 'auto' for 1/(10 N_train) "
          "(default: auto)")
    field("dp.allow_large_delta", default=False, help="accept a δ >= 1/N_train (refused otherwise)")
    field("dp.accountant", default="rdp", help="accountant of the reported, calibrated and budgeted ε; "
          "metrics.csv has rdp, prv and pld (default: rdp)")
    field("dp.max_epsilon", default=None,
          help="privacy budget: stop before the first step that would take ε above it (default: none)")
    add("--resume", default=None, metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR with its saved "
        "settings (only --data, --device and --quiet may be given again)")
    field("run.seed", default=0, help="seed of initialisation, sampling, data order and noise (default: 0)")
    field("run.device", default="auto", help="device (default: auto)")
    field("run.engine", default="fast", help="fast (device-resident data; falls back to opacus when unsupported) "
          "or opacus (default: fast)")
    field("model.width", default=16, help="channels of CelebaCNN's first block, a multiple of 8 (default: 16)")
    field("run.runs_dir", default="runs", help="runs go to <runs-dir>/celeba_<mode>/<run-name>/ (default: runs)")
    field("run.run_name", default=None, help="run folder name (default: from the settings; -2, -3... if taken)")
    field("run.quiet", default=False, help="no progress bars or per-epoch lines")
    return parser


def config_from_args(args: argparse.Namespace, given: Sequence[str]):
    """The job's config for these flags (``ValueError`` naming the flag)."""
    flags = args.flag_map
    if args.data is None:
        raise ValueError("--data is required: a folder made by celeba_preprocess.py (or give --resume RUN_DIR)")
    dp_flags = [flags.flag(field) for field in DP_ONLY_FIELDS if flags.flag(field) in given]
    if args.mode == "baseline" and dp_flags:
        raise ValueError(f"{dp_flags[0]} needs --mode dp (the baseline adds no noise and spends no privacy)")
    values = flags.values(args)
    values.update({"data.dataset": "celeba", "model.name": "celeba_cnn", "run.select": "best_val",
                   "run.test_every_epoch": False, "dp.enabled": args.mode == "dp",
                   "optim.lr": DEFAULT_LR[args.mode] if args.lr is None else args.lr})
    if args.optimizer != "sgd":
        values["optim.momentum"] = 0.0
    config = TrainConfig().with_overrides(values)
    return config if args.mode == "dp" else config.deactivated()


def _run(args: argparse.Namespace, given: list[str]) -> dict:
    flags = args.flag_map
    if args.resume is not None:
        check_resume_flags(given, ["--resume", *(flags.flag(field) for field in RESUME_FIELDS)])
        overrides = {field: value for field, value in flags.values(args, RESUME_FIELDS).items()
                     if flags.flag(field) in given}
        return train_job.run(resume=args.resume, overrides=overrides, summary_extra=strata)
    return train_job.run(config_from_args(args, given), group=f"celeba_{args.mode}", summary_extra=strata)


def strata(summary: dict) -> dict:
    """The CelebA names of the generic summary fields: ``mode`` and the ``*_per_stratum`` groups
    (the job adds them before it writes ``summary.json``: ``Hooks.summary_extra``)."""
    return {"mode": "dp" if summary["dp"] else "baseline",
            "test_accuracy_per_stratum": summary["test_accuracy_per_group"],
            "test_count_per_stratum": summary["test_count_per_group"]}


def main(argv: Sequence[str] | None = None, prog: str = "celeba_train.py") -> int:
    """``python scripts/celeba_train.py [flags]``: exit 0, or 2 with one ``error:`` line naming the flag."""
    parser = add_train_arguments(OneLineParser(
        prog=prog, description="Train the small CelebA CNN on a preprocessed folder: baseline or DP-SGD."))
    return front_end_main(parser, argv, run_parsed)


def run_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace, given: list[str]) -> int:
    """Run the parsed flags (``celeba_train.py`` and ``dpvision celeba train``); errors in this trainer's flags."""
    return run_front_end(parser, args, given, _run)

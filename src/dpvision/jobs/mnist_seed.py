"""``python mnist.py``: the MNIST seed's flags, mapped onto the one training job.

Every flag and default of the seed's table is kept (``--sigma``, ``--max-per-sample-grad-norm``,
``--epsilon``, ...); inside dpvision they are ``dp.noise_multiplier``, ``dp.max_grad_norm`` and
``dp.target_epsilon``. The job runs as ``dpvision train --config recipes/mnist_seed.yaml`` would,
and this front-end adds the seed's CSV: ``<out-dir>/mnist_{lr}_{sigma}_{C}_{batch}_{epochs}_{epsilon}_{k}.csv``
(columns ``Epoch,Train Accuracy,Test Accuracy,Epsilon,Delta``), rewritten after every epoch, with
a copy in the run folder (the shared name does not say the seed, δ or accountant: a second run
replaces it, and says so).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from dpvision.cli_support import OneLineParser, check_can_create_dir
from dpvision.jobs.config import TrainConfig
from dpvision.jobs import train as train_job  # train_job.run: looked up at call time (tests wrap it)
from dpvision.jobs.errors import front_end_main, run_front_end
from dpvision.jobs.flags import FlagMap
from dpvision.jobs.loop import check_resume_flags
from dpvision.runs import atomic_write_text, csv_text

SEED_CSV_COLUMNS = ["Epoch", "Train Accuracy", "Test Accuracy", "Epsilon", "Delta"]
DEFAULT_SIGMA, DEFAULT_EPSILON_LABEL = 1.3, 0.3
RESUME_FIELDS = ("data.root", "run.device", "run.quiet")  # with --resume and --out-dir, the only flags a resume takes
# The seed's spelling of the config fields (every other field it has is spelt as in dpvision train).
SEED_SPELLINGS = {"dp.target_epsilon": "--epsilon", "dp.max_grad_norm": "--max-per-sample-grad-norm",
                  "optim.eval_batch_size": "--test-batch-size"}
DP_ONLY_FLAGS = ("--sigma", "--epsilon", "--target-epsilon", "--max-epsilon")


def add_mnist_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The seed's flag table (same names and defaults) plus dpvision's own flags."""
    flags = FlagMap(SEED_SPELLINGS)
    add, field = parser.add_argument, lambda *a, **k: flags.add(parser, *a, **k)
    parser.set_defaults(flag_map=flags)
    field("optim.batch_size", default=256, help="batch size; under DP the expected batch size (default: 256)")
    field("optim.eval_batch_size", default=1024, help="batch size for testing (default: 1024)")
    field("optim.epochs", default=30, help="number of training epochs (default: 30)")
    field("optim.lr", default=0.15, help="learning rate (default: 0.15)")
    field("dp.noise_multiplier", default=None, help=f"noise multiplier for DP (default: {DEFAULT_SIGMA})")
    field("dp.max_grad_norm", default=1.0, help="per-sample clipping norm C (default: 1.0)")
    field("dp.delta", default="1e-5", help="delta parameter for DP, or 'auto' for 1/(10 k); must be below 1/k "
          "(default: 1e-5)")
    field("dp.allow_large_delta", default=False, help="accept a delta >= 1/k (refused otherwise)")
    field("dp.target_epsilon", default=None,
          help="target epsilon: when given, sigma is calibrated so the whole run ends at this epsilon "
               f"(default: {DEFAULT_EPSILON_LABEL}, then only a file-name label and --sigma rules)")
    add("--target-epsilon", type=float, default=None, help="same as --epsilon (the target epsilon)")
    field("dp.accountant", default="rdp", help="accountant of the reported, calibrated and budgeted epsilon; "
          "metrics.csv has rdp, prv and pld (default: rdp)")
    field("dp.max_epsilon", default=None,
          help="privacy budget: stop before the first step that would take epsilon above it (default: none)")
    add("--resume", default=None, metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR with its saved "
        "settings (only --data-root, --device, --quiet and --out-dir may be given again)")
    field("data.k", default=30_000, help="number of training samples, a seeded random subset (default: 30000)")
    add("--disable-dp", action="store_true", help="disable DP and run standard SGD")
    field("run.device", default="auto", help="training device (default: auto, cuda when available)")
    field("run.engine", default="fast", help="fast (dpvision's engine; falls back to opacus with a notice where "
          "unsupported) or opacus (the stock recipe) (default: fast)")
    field("data.root", default="data", help="folder holding MNIST/raw/ (default: data)")
    add("--out-dir", default="mnist", help="folder for the per-epoch CSV (default: mnist)")
    field("run.runs_dir", default="runs", help="folder for run folders runs/mnist/<run-name>/ (default: runs)")
    field("run.run_name", default=None, help="run folder name (default: the CSV's name; -2, -3... if taken)")
    field("run.seed", default=0, help="seed for subset, initialisation, sampling and noise (default: 0)")
    field("run.quiet", default=False, help="no progress bar or per-epoch lines")
    return parser


def config_from_args(args: argparse.Namespace, given: Sequence[str]):
    """The job's :class:`~dpvision.jobs.config.TrainConfig` for these flags (``ValueError`` naming a flag)."""
    if args.target_epsilon is not None:
        if args.epsilon is not None and args.epsilon != args.target_epsilon:
            raise ValueError(f"--epsilon {args.epsilon} and --target-epsilon {args.target_epsilon} disagree: they "
                             "are the same setting, give one of them")
        args.epsilon = args.target_epsilon
    if args.epsilon is not None and args.sigma is not None:
        raise ValueError("--sigma and --epsilon exclude each other: --epsilon is a target and sigma is calibrated "
                         "to reach it; give one of them")
    refused = [flag for flag in DP_ONLY_FLAGS if flag in given]
    if args.disable_dp and refused:
        raise ValueError(f"{refused[0]} needs DP: --disable-dp adds no noise and spends no privacy "
                         "(drop one of the two)")
    values = args.flag_map.values(args)
    if args.disable_dp:
        values = {k: v for k, v in values.items() if k not in ("dp.noise_multiplier", "dp.target_epsilon")}
    elif args.epsilon is None:
        values["dp.noise_multiplier"] = DEFAULT_SIGMA if args.sigma is None else args.sigma
    values.update({"data.dataset": "mnist", "model.name": "sample_convnet", "optim.name": "sgd",
                   "dp.enabled": not args.disable_dp})
    return TrainConfig().with_overrides(values)


class SeedCsv:
    """Writes the seed's CSV from the job's metric rows (``on_rows``), shared copy and run-folder copy."""

    def __init__(self, args: argparse.Namespace, out_dir: str | None) -> None:
        self.args, self.out_dir, self.announced, self.path, self.front = args, out_dir, False, None, None

    def name(self, resolved: dict, target: float | None) -> str:
        a = self.args
        sigma = f"{resolved['noise_multiplier']:.4g}" if target is not None else str(
            DEFAULT_SIGMA if a.sigma is None else a.sigma)
        epsilon = DEFAULT_EPSILON_LABEL if target is None else target
        return f"mnist_{a.lr}_{sigma}_{a.max_per_sample_grad_norm}_{a.batch_size}_{a.epochs}_{epsilon}_{a.k}.csv"

    def __call__(self, run_dir, rows: list[dict]) -> None:
        if self.front is None:  # what the run recorded (the name, the --out-dir): read once
            config = run_dir.read_config()
            self.front = config["resolved"].get("front_end", {})
            if self.out_dir is not None and self.front.get("out_dir") != str(self.out_dir):
                # a resume's new --out-dir: recorded (atomically), so config.yaml says where the CSV is
                # and a later --resume without --out-dir writes there too
                self.front = {**self.front, "out_dir": str(self.out_dir)}
                run_dir.write_config({**config, "resolved": {**config["resolved"], "front_end": self.front}})
        name, out_dir = self.front["seed_csv_name"], Path(self.out_dir or self.front["out_dir"])
        text = csv_text(SEED_CSV_COLUMNS, [{"Epoch": r["epoch"], "Train Accuracy": r["train_accuracy"],
                                            "Test Accuracy": r["test_accuracy"], "Epsilon": r["epsilon"],
                                            "Delta": r["delta"]} for r in rows])
        own, shared = run_dir.path / name, out_dir / name
        if not self.announced and shared.exists() and (not own.exists() or own.read_text() != shared.read_text()):
            print(f"note: replacing {shared} (written by another run; every run folder keeps its own copy)",
                  file=sys.stderr, flush=True)
        self.announced = True
        atomic_write_text(own, text)
        atomic_write_text(shared, text)
        self.path = shared


def main(argv: Sequence[str] | None = None, prog: str = "mnist.py") -> int:
    """``python mnist.py [flags]``: exit 0, or 2 with one ``error:`` line naming the flag."""
    parser = add_mnist_arguments(OneLineParser(prog=prog, description="Train SampleConvNet on MNIST, with or "
                                                                      "without DP-SGD."))
    return front_end_main(parser, argv, run_parsed)


def run_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace, given: list[str]) -> int:
    """Run the parsed flags (``python mnist.py`` and ``dpvision mnist``); errors in the seed's flag names."""
    return run_front_end(parser, args, given, _run)


def _run(args: argparse.Namespace, given: list[str]) -> dict:
    if args.resume is not None:
        check_resume_flags(given, ["--resume", "--out-dir", *(args.flag_map.flag(f) for f in RESUME_FIELDS)])
        overrides = {field: value for field, value in args.flag_map.values(args, RESUME_FIELDS).items()
                     if args.flag_map.flag(field) in given}
        out_dir = args.out_dir if "--out-dir" in given else None
        if out_dir is not None:
            check_can_create_dir(out_dir, "--out-dir")
        csv = SeedCsv(args, out_dir)
        summary = train_job.run(resume=args.resume, overrides=overrides, on_rows=csv)
        print(f"Seed CSV: {csv.path}", flush=True)
        return summary
    config = config_from_args(args, given)
    check_can_create_dir(args.out_dir, "--out-dir")
    csv = SeedCsv(args, args.out_dir)

    def front_end(resolved: dict) -> dict:
        name = csv.name(resolved, config.dp.target_epsilon)
        return {"out_dir": args.out_dir, "seed_csv_name": name, "run_name": Path(name).stem}

    summary = train_job.run(config, group="mnist", run_name=args.run_name, on_rows=csv, front_end=front_end)
    print(f"Seed CSV: {csv.path}", flush=True)
    return summary

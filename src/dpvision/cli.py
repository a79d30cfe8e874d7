"""Command-line entry points: ``dpvision <subcommand>`` and the seed's ``python mnist.py``.

Bad input exits with status 2 and one line that names the flag and what would
be valid, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from dpvision.training.engine import ENGINES


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line on stderr and exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _one_line_warnings() -> None:
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def add_mnist_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed's flag table (same names and defaults) plus dpvision's own flags."""
    add = parser.add_argument
    add("--batch-size", type=int, default=256, help="batch size for training; under DP the expected batch size (default: 256)")
    add("--test-batch-size", type=int, default=1024, help="batch size for testing (default: 1024)")
    add("--epochs", type=int, default=30, help="number of training epochs (default: 30)")
    add("--lr", type=float, default=0.15, help="learning rate (default: 0.15)")
    add("--sigma", type=float, default=None, help="noise multiplier for DP (default: 1.3)")
    add("--max-per-sample-grad-norm", type=float, default=1.0, help="per-sample gradient clipping norm C (default: 1.0)")
    add("--delta", type=float, default=1e-5, help="delta parameter for DP (default: 1e-5)")
    add("--epsilon", type=float, default=None,
        help="target epsilon: when given, sigma is calibrated so the whole run ends at this epsilon "
             "(default: 0.3, then only a file-name label and --sigma rules)")
    add("--k", type=int, default=30_000, help="number of training samples, a seeded random subset (default: 30000)")
    add("--disable-dp", action="store_true", help="disable DP and run standard SGD")
    add("--device", default="auto", help="training device: cpu, cuda or auto (default: auto, cuda when available)")
    add("--engine", default="opacus", choices=ENGINES, help="training engine (default: opacus)")
    add("--data-root", default="data", help="folder holding MNIST/raw/ (default: data)")
    add("--out-dir", default="mnist", help="folder for the per-epoch CSV (default: mnist)")
    add("--runs-dir", default="runs", help="folder for run folders runs/mnist/<run-name>/ (default: runs)")
    add("--run-name", default=None, help="run folder name (default: the CSV's name; -2, -3... if taken)")
    add("--seed", type=int, default=0, help="random seed for subset, initialisation, sampling and noise (default: 0)")
    add("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def mnist_config_from_args(args: argparse.Namespace):
    from dpvision.mnist import MnistConfig

    if args.epsilon is not None and args.sigma is not None:
        raise ValueError("--sigma and --epsilon exclude each other: --epsilon is a target and sigma is "
                         "calibrated to reach it; give one of them")
    return MnistConfig(
        batch_size=args.batch_size, test_batch_size=args.test_batch_size, epochs=args.epochs, lr=args.lr,
        sigma=1.3 if args.sigma is None else args.sigma, max_per_sample_grad_norm=args.max_per_sample_grad_norm,
        delta=args.delta, epsilon=0.3 if args.epsilon is None else args.epsilon,
        epsilon_is_target=args.epsilon is not None, k=args.k, disable_dp=args.disable_dp, device=args.device,
        engine=args.engine, data_root=args.data_root, out_dir=args.out_dir, runs_dir=args.runs_dir,
        run_name=args.run_name, seed=args.seed, quiet=args.quiet,
    )


def run_mnist(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dpvision.data.mnist import DataNotFoundError
    from dpvision.mnist import run, validate

    try:
        config = mnist_config_from_args(args)
        validate(config)
    except ValueError as err:
        parser.error(str(err))
    try:
        run(config)
    except DataNotFoundError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def mnist_main(argv: Sequence[str] | None = None, prog: str = "mnist.py") -> int:
    """``python mnist.py [flags]``."""
    _one_line_warnings()
    parser = OneLineParser(prog=prog, description="Train SampleConvNet on MNIST, with or without DP-SGD.")
    add_mnist_arguments(parser)
    return run_mnist(parser.parse_args(argv), parser)


def main(argv: Sequence[str] | None = None) -> int:
    """``dpvision <subcommand> ...``."""
    _one_line_warnings()
    parser = OneLineParser(prog="dpvision", description="Differentially private image classifiers (DP-SGD).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    mnist = sub.add_parser("mnist", help="train SampleConvNet on MNIST (same flags as python mnist.py)")
    add_mnist_arguments(mnist)
    mnist.set_defaults(handler=lambda args: run_mnist(args, mnist))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""Command-line entry points: ``dpvision <subcommand>`` and the seed's ``python mnist.py``.

Bad input exits with status 2 and one line that names the flag and what would
be valid, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dpvision.cli_support import OneLineParser, one_line_warnings
from dpvision.engines import ENGINES


def _delta(text: str) -> float | str:
    """``--delta``: a number, or ``auto`` for 1 / (10 N)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1) or 'auto', got {text!r}") from None


def given_flags(add_arguments, argv: Sequence[str]) -> list[str]:
    """The flags actually present in ``argv`` (abbreviations resolved), for ``--resume``'s check.

    Parses ``argv`` again with every default suppressed: what is left was typed.
    """
    probe = argparse.ArgumentParser(add_help=False)
    add_arguments(probe)
    flags = {}
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        if action.option_strings:
            flags[action.dest] = max(action.option_strings, key=len)
    namespace, _ = probe.parse_known_args(list(argv))
    return [flags[dest] for dest in vars(namespace) if dest in flags]


def add_mnist_arguments(parser: argparse.ArgumentParser) -> None:
    """The seed's flag table (same names and defaults) plus dpvision's own flags."""
    add = parser.add_argument
    add("--batch-size", type=int, default=256, help="batch size for training; under DP the expected batch size (default: 256)")
    add("--test-batch-size", type=int, default=1024, help="batch size for testing (default: 1024)")
    add("--epochs", type=int, default=30, help="number of training epochs (default: 30)")
    add("--lr", type=float, default=0.15, help="learning rate (default: 0.15)")
    add("--sigma", type=float, default=None, help="noise multiplier for DP (default: 1.3)")
    add("--max-per-sample-grad-norm", type=float, default=1.0, help="per-sample gradient clipping norm C (default: 1.0)")
    add("--delta", type=_delta, default=1e-5,
        help="delta parameter for DP, or 'auto' for 1/(10 k) (default: 1e-5)")
    add("--epsilon", type=float, default=None,
        help="target epsilon: when given, sigma is calibrated so the whole run ends at this epsilon "
             "(default: 0.3, then only a file-name label and --sigma rules)")
    add("--target-epsilon", type=float, default=None, help="same as --epsilon (the target epsilon)")
    add("--accountant", default="rdp", choices=("rdp", "prv", "pld"),
        help="accountant of the reported, calibrated and budgeted epsilon; metrics.csv has all three "
             "(default: rdp)")
    add("--max-epsilon", type=float, default=None,
        help="privacy budget: stop before the first step that would take epsilon above it (default: none)")
    add("--resume", default=None, metavar="RUN_DIR",
        help="continue the interrupted run in RUN_DIR with its saved settings (only --data-root, --device "
             "and --quiet may be given again)")
    add("--k", type=int, default=30_000, help="number of training samples, a seeded random subset (default: 30000)")
    add("--disable-dp", action="store_true", help="disable DP and run standard SGD")
    add("--device", default="auto", help="training device: cpu, cuda or auto (default: auto, cuda when available)")
    add("--engine", default="fast", choices=ENGINES,
        help="fast (dpvision engine; falls back to opacus with a notice where unsupported) or opacus (the stock recipe) (default: fast)")
    add("--data-root", default="data", help="folder holding MNIST/raw/ (default: data)")
    add("--out-dir", default="mnist", help="folder for the per-epoch CSV (default: mnist)")
    add("--runs-dir", default="runs", help="folder for run folders runs/mnist/<run-name>/ (default: runs)")
    add("--run-name", default=None, help="run folder name (default: the CSV's name; -2, -3... if taken)")
    add("--seed", type=int, default=0, help="random seed for subset, initialisation, sampling and noise (default: 0)")
    add("--quiet", action="store_true", help="no progress bar or per-epoch lines")


def mnist_config_from_args(args: argparse.Namespace):
    from dpvision.mnist import MnistConfig

    if args.target_epsilon is not None:
        if args.epsilon is not None and args.epsilon != args.target_epsilon:
            raise ValueError(f"--epsilon {args.epsilon} and --target-epsilon {args.target_epsilon} disagree: "
                             "they are the same setting, give one of them")
        args.epsilon = args.target_epsilon
    if args.epsilon is not None and args.sigma is not None:
        raise ValueError("--sigma and --epsilon exclude each other: --epsilon is a target and sigma is "
                         "calibrated to reach it; give one of them")
    return MnistConfig(
        batch_size=args.batch_size, test_batch_size=args.test_batch_size, epochs=args.epochs, lr=args.lr,
        sigma=1.3 if args.sigma is None else args.sigma, max_per_sample_grad_norm=args.max_per_sample_grad_norm,
        delta=args.delta, epsilon=0.3 if args.epsilon is None else args.epsilon,
        epsilon_is_target=args.epsilon is not None, k=args.k, disable_dp=args.disable_dp, device=args.device,
        engine=args.engine, data_root=args.data_root, out_dir=args.out_dir, runs_dir=args.runs_dir,
        run_name=args.run_name, seed=args.seed, quiet=args.quiet, accountant=args.accountant,
        max_epsilon=args.max_epsilon,
    )


def run_mnist(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str] = ()) -> int:
    from dpvision.checkpoint import CheckpointError
    from dpvision.data.mnist import DataNotFoundError
    from dpvision.mnist import RESUME_FLAGS, load_resume_config, run, validate
    from dpvision.jobs.loop import check_resume_flags

    try:
        if args.resume is not None:
            given = given_flags(add_mnist_arguments, argv)
            check_resume_flags(given, RESUME_FLAGS)
            overrides = {"data_root": args.data_root, "device": args.device, "quiet": args.quiet}
            dests = {"--data-root": "data_root", "--device": "device", "--quiet": "quiet"}
            config, _ = load_resume_config(args.resume, **{dests[f]: overrides[dests[f]] for f in given
                                                          if f in dests})
        else:
            config = mnist_config_from_args(args)
            validate(config)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    try:
        run(config, resume=args.resume)
    except (DataNotFoundError, CheckpointError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return 0


def mnist_main(argv: Sequence[str] | None = None, prog: str = "mnist.py") -> int:
    """``python mnist.py [flags]``."""
    one_line_warnings()
    parser = OneLineParser(prog=prog, description="Train SampleConvNet on MNIST, with or without DP-SGD.")
    add_mnist_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_mnist(parser.parse_args(argv), parser, argv)


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """``dpvision audit``: one training run with canaries, an ε lower bound, a verdict."""
    add = parser.add_argument
    add("--mode", default="white", choices=("white", "black"),
        help="white: gradient canaries, every iterate seen (tighter); black: mislabelled images, final model "
             "(default: white)")
    add("--canaries", type=int, default=1000, help="number of canaries m, each included with probability 1/2 (default: 1000)")
    add("--k", type=int, default=10_000, help="real MNIST training examples (default: 10000)")
    add("--batch-size", type=int, default=250, help="expected batch size (default: 250)")
    add("--epochs", type=int, default=5, help="training epochs (default: 5)")
    add("--lr", type=float, default=0.5, help="SGD learning rate (default: 0.5)")
    add("--model", default="convnet", choices=("convnet", "linear"), help="model (default: convnet)")
    add("--sigma", type=float, default=None, help="noise multiplier (give this or --epsilon)")
    add("--epsilon", "--target-epsilon", dest="epsilon", type=float, default=None,
        help="target epsilon: sigma is calibrated so the run ends at it")
    add("--max-grad-norm", type=float, default=1.0, help="clipping norm C (default: 1.0)")
    add("--delta", type=_delta, default=1e-5, help="delta, or 'auto' for 1/(10 k) (default: 1e-5)")
    add("--accountant", default="rdp", choices=("rdp", "prv", "pld"), help="accountant of the claimed epsilon (default: rdp)")
    add("--disable-dp", action="store_true", help="no noise (clipping kept): the non-private reference")
    add("--score", default="steps", choices=("steps", "final"),
        help="white-box score: likelihood ratio over all iterates, or <c, theta_0 - theta_T> (default: steps)")
    add("--confidence", type=float, default=0.95, help="confidence of the lower bound (default: 0.95)")
    add("--noise-scale-for-testing", type=float, default=1.0,
        help="multiply the noise std (testing only: < 1 is a broken run the audit should catch)")
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add("--data-root", default="data", help="folder holding MNIST/raw/ (default: data)")
    add("--device", default="cpu", help="device (default: cpu)")
    add("--out", default="audit.json", help="where to write the audit JSON (default: audit.json)")


def run_audit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Print the one-line verdict; exit 0 when consistent, 1 when the audit caught a violation."""
    from dpvision.audit import AuditConfig
    from dpvision.audit import run_audit as audit
    from dpvision.data.mnist import DataNotFoundError, ensure_mnist
    from dpvision.runs import atomic_write_json

    try:
        config = AuditConfig(
            mode=args.mode, canaries=args.canaries, k=args.k, batch_size=args.batch_size, epochs=args.epochs,
            lr=args.lr, model=args.model, sigma=args.sigma, epsilon=args.epsilon, max_grad_norm=args.max_grad_norm,
            delta=args.delta, accountant=args.accountant, disable_dp=args.disable_dp, score=args.score,
            confidence=args.confidence, noise_scale_for_testing=args.noise_scale_for_testing, seed=args.seed,
            data_root=args.data_root, device=args.device)
        ensure_mnist(args.data_root)
    except ValueError as err:
        parser.error(str(err))
    except DataNotFoundError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    result = audit(config)
    atomic_write_json(args.out, result)
    print(result["verdict"], flush=True)
    return 0 if result["consistent"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``dpvision <subcommand> ...``."""
    one_line_warnings()
    parser = OneLineParser(prog="dpvision", description="Differentially private image classifiers (DP-SGD).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    mnist = sub.add_parser("mnist", help="train SampleConvNet on MNIST (same flags as python mnist.py)")
    add_mnist_arguments(mnist)
    mnist.set_defaults(handler=lambda args: run_mnist(args, mnist, argv[1:]))
    audit = sub.add_parser("audit", help="one-run empirical privacy audit (Steinke, Nasr, Jagielski 2023)")
    add_audit_arguments(audit)
    audit.set_defaults(handler=lambda args: run_audit(args, audit))
    from dpvision.celeba.cli import add_subcommands as add_celeba_subcommands

    add_celeba_subcommands(sub)  # dpvision celeba make-demo-archive | build-subset | preprocess | train
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None) or args.func
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""``dpvision audit``: one training run with canaries, an ε lower bound, a verdict.

Every output is checked before the audit trains (an existing or unwritable ``--out`` fails at once).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpvision.cli_support import check_can_create_dir
from dpvision.privacy import ACCOUNTANT_REGISTRY, parse_delta


def _delta(text: str):
    try:
        return parse_delta(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).split(" ", 1)[1]) from None


def check_out_file(path: str, flag: str = "--out") -> None:
    """Refuse an --out that is a folder or cannot be created, before any work."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} must be a file path, got {path!r} (an existing folder)")
    check_can_create_dir(target.absolute().parent, flag)


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
    add("--accountant", default="rdp", choices=tuple(ACCOUNTANT_REGISTRY),
        help="accountant of the claimed epsilon (default: rdp)")
    add("--disable-dp", action="store_true", help="no noise (clipping kept): the non-private reference")
    add("--score", default="steps", choices=("steps", "final"),
        help="white-box score: likelihood ratio over all iterates, or <c, theta_0 - theta_T> (default: steps)")
    add("--confidence", type=float, default=0.95, help="confidence of the lower bound (default: 0.95)")
    add("--noise-scale-for-testing", type=float, default=1.0,
        help="multiply the noise std (testing only: < 1 is a broken run the audit should catch)")
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add("--data-root", default="data", help="folder holding MNIST/raw/ (default: data)")
    add("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
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
        check_out_file(args.out)
        ensure_mnist(args.data_root)
    except ValueError as err:
        parser.error(str(err))
    except DataNotFoundError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    result = audit(config)
    atomic_write_json(args.out, result)
    print(result["verdict"], flush=True)
    return 0 if result["consistent"] else 1

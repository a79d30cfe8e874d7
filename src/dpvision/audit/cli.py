"""``dpvision audit``: one training run with canaries, two ε lower bounds, PASS or FAIL.

Outputs go to a new run folder ``<runs-dir>/audit/<name>/`` (never overwritten: ``-2``, ``-3``, ...
are appended), holding ``audit.json`` (written atomically). Every input is checked before training.
"""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from dpvision.privacy import ACCOUNTANTS, parse_delta


def _delta(text: str):
    try:
        return parse_delta(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).split(" ", 1)[1]) from None


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """``dpvision audit``: one training run with canaries, an ε lower bound, a verdict."""
    add = parser.add_argument
    add("--mode", default="white", choices=("white", "black"),
        help="white: gradient canaries, every iterate seen (tighter); black: mislabelled images, final model "
             "(default: white)")
    add("--canaries", type=int, default=20_000,
        help="number of canaries m, each included with probability 1/2 (default: 20000)")
    add("--k", type=int, default=1000, help="real MNIST training examples (default: 1000)")
    add("--batch-size", type=int, default=None,
        help="expected batch size (default: --k, full-batch DP-SGD: the tightest audit)")
    add("--epochs", type=int, default=10, help="training epochs (default: 10)")
    add("--lr", type=float, default=0.5, help="SGD learning rate (default: 0.5)")
    add("--model", default="convnet", choices=("convnet", "linear"), help="model (default: convnet)")
    add("--sigma", type=float, default=None, help="noise multiplier (give this or --epsilon)")
    add("--epsilon", "--target-epsilon", dest="epsilon", type=float, default=None,
        help="target epsilon: sigma is calibrated so the run ends at it")
    add("--max-grad-norm", type=float, default=1.0, help="clipping norm C (default: 1.0)")
    add("--delta", type=_delta, default=1e-5, help="delta, or 'auto' for 1/(10 k) (default: 1e-5)")
    add("--accountant", default="pld", choices=ACCOUNTANTS,
        help="accountant of the claimed epsilon and the calibration (default: pld, the tightest)")
    add("--disable-dp", action="store_true", help="no noise (clipping kept): the non-private reference")
    add("--score", default="steps", choices=("steps", "final"),
        help="white-box threat model: steps = every iterate seen (likelihood ratio), final = last iterate only "
             "(default: steps)")
    add("--confidence", type=float, default=0.95, help="confidence of the lower bound (default: 0.95)")
    add("--seed", type=int, default=0, help="random seed (default: 0)")
    add("--data-root", default="data", help="folder holding MNIST/raw/ (default: data)")
    add("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    add("--runs-dir", default="runs", help="runs folder; the audit goes to RUNS_DIR/audit/NAME/ (default: runs)")
    add("--name", default=None, help="run folder name (default: MODE-SCORE-epsE-seedS; never overwritten: -2, -3, ...)")
    add("--quiet", action="store_true", help="no progress bar")


def default_name(config) -> str:
    privacy = "nodp" if config.disable_dp else (f"eps{config.epsilon:g}" if config.epsilon else f"sigma{config.sigma:g}")
    return f"{config.mode}-{config.score}-{privacy}-seed{config.seed}"


CHECK_VERDICTS = {"noise": ": REJECTED, less noise than claimed",
                  "clipping": ": REJECTED, more than C per sampled step or sampled more often than q"}


def _check_lines(checks: dict) -> list[str]:
    """The mechanism checks' line (white-box runs with noise), else none."""
    if not checks:
        return []
    noise, clipping = checks["noise"], checks["clipping"]
    verdicts = {name: CHECK_VERDICTS[name] if check["rejects_claim"] else ": passes" for name, check in checks.items()}
    return [f"  mechanism checks (level {noise['level']:.2g} each): noise: the left-out canaries' spread is "
            f"{noise['spread_ratio']:.3f} sigma (z = {noise['z']:.1f}, chi-square p = {noise['p_value']:.2g})"
            f"{verdicts['noise']}; clipping: the included canaries add {clipping['contribution_ratio']:.3f}x what "
            f"clipping at C and sampling at q allow (z = {clipping['z']:.1f}, p = {clipping['p_value']:.2g})"
            f"{verdicts['clipping']}"]


def summary_lines(result: dict, folder) -> list[str]:
    """The verdict, both bounds, the sampling and mechanism checks, the claim under every accountant, what it shows."""
    steinke, fdp, sampling = result["steinke"], result["fdp"], result["sampling"]
    claims = ", ".join(f"{name} {value:.3f}" for name, value in result["epsilons"].items())
    floor = ">= " if fdp["at_floor"] else ""
    verdict = result["verdict"]
    lines = [
        f"{verdict}: audit ({result['threat_model']}, m={result['canaries']} canaries, "
        f"{result['canaries_included']} in): epsilon >= {result['epsilon_lower_bound']:.3f} at "
        f"{result['confidence']:.0%} confidence ({result['analysis']}); claimed epsilon = {result['epsilon']:.3f} "
        f"({result['accountant']}, delta = {result['delta']:g})",
        f"  Steinke et al. 2023: epsilon >= {steinke['epsilon_lower_bound']:.3f} ({steinke['correct']}/"
        f"{steinke['guesses']} correct guesses); f-DP (Mahloujifar et al. 2025, DP-SGD curves at q = "
        f"{result['sample_rate']:.4g}, T = {result['steps']}): epsilon >= {floor}{fdp['epsilon_lower_bound']:.3f} "
        f"({fdp['correct']}/{fdp['guesses']} correct{'; rejects the claimed curve' if fdp['rejects_claim'] else ''})",
    ]
    if sampling["k_minus"]:
        lines.append(f"  sampling check: {sampling['correct']}/{sampling['k_minus']} lowest-scored canaries are out "
                     f"(Poisson sampling at q = {result['sample_rate']:.4g} allows {sampling['ceiling']:.1%}; p = "
                     f"{sampling['p_value']:.2g}, level {sampling['level']:.3g}"
                     f"{': REJECTED, the run does not sample as claimed' if sampling['rejects_claim'] else ''})")
    lines.extend(_check_lines(result.get("checks") or {}))
    lines.append(f"  claimed epsilon under every accountant: {claims} (the claimed curve's epsilon: "
                 f"{result['epsilon_claimed_curve_pld']:.3f}); guesses planned from the claim alone "
                 f"(expected f-DP bound of a correct run: {result['plan']['expected_fdp']:.3f})")
    if verdict == "PASS":
        lines.append("  PASS shows no leak larger than claimed was found by this attack; it does not prove the run "
                     "private (a one-run audit sees only part of the worst case; docs/privacy.md).")
    else:
        lines.append("  FAIL: with the stated confidence the run leaks more than its accountant claims (a bug in "
                     "noise, clipping, sampling or accounting); the bound is a lower bound, not the run's true epsilon.")
    lines.append(f"Outputs: {folder}/ (audit.json)")
    return lines


def config_from_args(args: argparse.Namespace):
    """The AuditConfig of parsed ``dpvision audit`` flags (ValueError names the bad flag)."""
    from dpvision.audit import AuditConfig

    return AuditConfig(
        mode=args.mode, canaries=args.canaries, k=args.k, batch_size=args.batch_size, epochs=args.epochs,
        lr=args.lr, model=args.model, sigma=args.sigma, epsilon=args.epsilon, max_grad_norm=args.max_grad_norm,
        delta=args.delta, accountant=args.accountant, disable_dp=args.disable_dp, score=args.score,
        confidence=args.confidence, seed=args.seed, data_root=args.data_root, device=args.device)


def run_audit(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Print the verdict; exit 0 on PASS, 1 on FAIL (a lower bound above the claimed epsilon)."""
    from dpvision.audit import run_audit as audit
    from dpvision.data.mnist import DataNotFoundError, ensure_mnist
    from dpvision.privacy.plan import Plan
    from dpvision.runs import RunDir, atomic_write_json, check_writable_dir

    try:
        config = config_from_args(args)
        if args.name is not None and (not args.name or "/" in args.name or args.name in (".", "..")):
            raise ValueError(f"--name must be a plain folder name, got {args.name!r}")
        check_writable_dir(args.runs_dir, flag="--runs-dir")
        ensure_mnist(args.data_root)
    except ValueError as err:
        parser.error(str(err))
    except DataNotFoundError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    total = Plan(num_train=config.k, batch_size=config.batch_size, epochs=config.epochs,
                 max_grad_norm=config.max_grad_norm).total_steps  # the bar's length
    with tqdm(total=total, desc="audit", unit="step", disable=args.quiet, file=sys.stderr, leave=False) as bar:
        result = audit(config, progress=bar.update)
    run = RunDir.create(args.runs_dir, "audit", args.name or default_name(config))
    atomic_write_json(run.path / "audit.json", result)
    print("\n".join(summary_lines(result, run.path)), flush=True)
    return 0 if result["verdict"] == "PASS" else 1

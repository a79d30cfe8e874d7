"""The audit's bug-injection suite at a chosen size (issue 25: "at full size on the GPU").

Runs the correct audit and the same audit against each deliberately broken training of the test harness
(``tests/test_audit_bugs.py``: the bugs exist only there, never as options of the training job) with the
harness's settings (claimed ε = 4, q = 0.5, 2 steps, pld accountant) at the size given here, and prints one
line per run: verdict, the lower bound, the f-DP and sampling tests, the noise and clipping checks.

    python benchmarks/audit_bugs.py --model convnet --k 60000 --canaries 20000 --data-root data --device cuda
    python benchmarks/audit_bugs.py --k 500 --data-root data --device cpu        # the CI size
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_audit_bugs import BUGS, CI, _tamper  # noqa: E402 (the harness lives with the tests)

from dpvision.audit import AuditConfig, run_audit  # noqa: E402
from dpvision.runs import atomic_write_json  # noqa: E402


def on_device(tamper):
    """The harness's samplers draw on the CPU; hand their masks to the engine's device."""
    def apply(engine) -> None:
        tamper(engine)
        draw, device = engine.sampler.draw, next(engine.model.parameters()).device
        engine.sampler.draw = lambda steps, n: draw(steps, n).to(device)
    return apply


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=CI["model"])
    p.add_argument("--k", type=int, default=CI["k"], help="training examples; the batch is k/2 (q = 0.5)")
    p.add_argument("--canaries", type=int, default=CI["canaries"])
    p.add_argument("--seed", type=int, default=CI["seed"])
    p.add_argument("--data-root", default="data")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    settings = {**CI, "model": args.model, "k": args.k, "batch_size": args.k // 2, "canaries": args.canaries,
                "seed": args.seed, "data_root": args.data_root, "device": args.device}
    rows = []
    for bug in ("none",) + BUGS:
        started = time.perf_counter()
        result = run_audit(AuditConfig(**settings), tamper=None if bug == "none" else on_device(_tamper(bug)))
        row = {"bug": bug, "verdict": result["verdict"], "claimed_epsilon": result["epsilon"],
               "lower_bound": result["epsilon_lower_bound"], "fdp_rejects": result["fdp"]["rejects_claim"],
               "fdp_correct": f"{result['fdp']['correct']}/{result['fdp']['guesses']}",
               "sampling_out": f"{result['sampling']['correct']}/{result['sampling']['k_minus']}",
               "sampling_p": result["sampling"]["p_value"],
               "sampling_rejects": result["sampling"]["rejects_claim"], "checks": result["checks"],
               "seconds": time.perf_counter() - started}
        rows.append(row)
        noise, clipping = result["checks"]["noise"], result["checks"]["clipping"]
        print(f"{bug:18s} {row['verdict']:4s} bound {row['lower_bound']:.2f} (claimed {row['claimed_epsilon']:.2f}) "
              f"fdp {row['fdp_correct']} rejects {row['fdp_rejects']} | sampling {row['sampling_out']} p "
              f"{row['sampling_p']:.2g} rejects {row['sampling_rejects']} | noise check: spread "
              f"{noise['spread_ratio']:.3f} sigma, z {noise['z']:.1f}, p {noise['p_value']:.2g} | clipping check: "
              f"{clipping['contribution_ratio']:.3f}x, z {clipping['z']:.1f}, p {clipping['p_value']:.2g} | "
              f"{row['seconds']:.1f} s", flush=True)
    if args.json:
        atomic_write_json(args.json, {"settings": settings, "rows": rows})  # temp file, then rename
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an audit costs: the audit of a run, then the training run it audits, timed alone.

    python -m dpvision.audit.cost [the ``dpvision audit`` flags]

trains the audited run once untimed (a warm-up: data, calibration, CUDA context, kernels), then runs
the audit (training with the canaries in its clipped sum, the guess plan, the scores and the
analyses) and times it end to end, then trains the audited run again WITHOUT canaries (same data,
model, plan, seed, fast engine) and times it. It prints both times, their ratio (the
target: at most 2) and the audit's summary. Nothing is written.

Example (CPU, seconds):
    python -m dpvision.audit.cost --model linear --k 500 --batch-size 500 --epochs 4 --canaries 2000 \\
        --epsilon 4 --data-root data --quiet
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from dpvision.audit.cli import add_audit_arguments, config_from_args, summary_lines
from dpvision.audit.runner import AuditConfig, audit_data, audit_device, audit_plan, build_model, run_audit
from dpvision.audit.instrument import build_instrumented_engine
from dpvision.data.mnist import DataNotFoundError, ensure_mnist


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(config: AuditConfig) -> tuple[float, int]:
    """Seconds and steps of the audited run without canaries (data loading and engine set-up included)."""
    device = audit_device(config)
    started = time.perf_counter()
    data, _ = audit_data(config)
    plan = audit_plan(config, config.k)
    engine = build_instrumented_engine(model=build_model(config.model), train_data=data, plan=plan, lr=config.lr,
                                       seed=config.seed, device=device, instrument=None)
    steps = sum(engine.train_epoch().steps for _ in range(config.epochs))
    _synchronize(device)
    return time.perf_counter() - started, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpvision.audit.cost", description=__doc__.split("\n")[0])
    add_audit_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        if config.mode != "white":
            raise ValueError("--mode must be white for the cost comparison (black-box trains on other data)")
        ensure_mnist(config.data_root)
    except ValueError as err:
        parser.error(str(err))
    except DataNotFoundError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    # One untimed training run first: both timings then start warm (MNIST decoded, σ calibrated and cached, the
    # CUDA context, kernels and cuDNN's choices made), instead of the one-time costs falling on whichever runs
    # first. The audit is timed next, then the training run again.
    cold_seconds, _ = time_training(config)
    started = time.perf_counter()
    result = run_audit(config)
    _synchronize(audit_device(config))
    audit_seconds = time.perf_counter() - started
    train_seconds, steps = time_training(config)
    print(f"warm-up training run (cold, not in the ratio): {cold_seconds:.1f} s")
    print(f"training run alone: {train_seconds:.1f} s ({steps} steps, {config.model}, k = {config.k}, "
          f"batch {config.batch_size}, {audit_device(config).type})")
    print(f"audit of that run: {audit_seconds:.1f} s ({result['canaries']} canaries): "
          f"{audit_seconds / train_seconds:.2f}x the training run (target: at most 2x; both after one untimed "
          "warm-up training run)", flush=True)
    print("\n".join(summary_lines(result, "(not saved)")[:-1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

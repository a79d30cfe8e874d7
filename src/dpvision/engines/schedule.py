"""Learning-rate schedules applied step by step, whatever wraps the optimizer.

The schedule lives in a step pre-hook on the torch optimizer itself, so it works the
same under the fast engine and under Opacus's ``DPOptimizer`` (which calls the
original optimizer's ``step``). The step count is kept in the optimizer's first
param group, so it travels with ``optimizer.state_dict()`` into checkpoints and a
resumed run continues the schedule where it stopped.

Example:
    >>> [round(lr_at(t, base_lr=1.0, schedule="cosine", warmup_steps=2, total_steps=6), 3) for t in range(6)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine")
STEP_KEY = "dpvision_step"  # optimizer.param_groups[0][STEP_KEY]: steps taken so far


def lr_at(step: int, *, base_lr: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up, then constant or cosine decay to 0."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay, 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def attach_schedule(optimizer: torch.optim.Optimizer, *, base_lr: float, schedule: str, warmup_steps: int,
                    total_steps: int) -> None:
    """Set every group's lr before each ``optimizer.step()`` from the schedule (no-op for a constant lr)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "constant" and warmup_steps == 0:
        return  # nothing to do: leave the optimizer exactly as torch made it
    optimizer.param_groups[0].setdefault(STEP_KEY, 0)

    def before_step(opt, args, kwargs) -> None:
        step = int(opt.param_groups[0][STEP_KEY])
        lr = lr_at(step, base_lr=base_lr, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.param_groups[0][STEP_KEY] = step + 1

    optimizer.register_step_pre_hook(before_step)

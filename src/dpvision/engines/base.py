"""The engine interface: what one epoch of training is, and the settings every engine takes.

An engine owns one epoch of training: sampling batches, per-example clipping,
noise and the optimizer step. The job (:mod:`dpvision.jobs`) owns everything
around it: evaluation, metrics, privacy ledger, run folders.

DP is one wrapping setting: with ``dp=None`` an engine trains with plain SGD on
shuffled batches; with :class:`DPSettings` it runs DP-SGD (Poisson sampling,
per-sample clipping to C, Gaussian noise of std σC on the sum).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dpvision.data.tensors import ImageTensors
from dpvision.engines.evaluation import evaluate  # noqa: F401 (part of the engine interface)
from dpvision.privacy.accounting import poisson_sample_rate, steps_per_epoch

ENGINES = ("fast", "opacus")
OPTIMIZERS = ("sgd", "adam")

ProgressFn = Callable[[int], None]  # called with the number of steps just done


@dataclass(kw_only=True, frozen=True)
class DPSettings:
    """Per-example clipping norm C and noise multiplier σ (noise std is σC)."""

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier (--sigma) must be >= 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm (--max-per-sample-grad-norm) must be > 0, got {self.max_grad_norm}")


@dataclass(kw_only=True, frozen=True)
class OptimizerSpec:
    """The torch optimizer an engine builds, and its learning-rate schedule (per step)."""

    name: str = "sgd"
    lr: float
    momentum: float = 0.0  # SGD only
    schedule: str = "constant"  # or "cosine" (to 0 over total_steps)
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps
    total_steps: int = 0  # the run's optimizer steps (what "cosine" decays over)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if not self.lr >= 0:
            raise ValueError(f"lr (--lr) must be >= 0, got {self.lr}")

    def build(self, params) -> torch.optim.Optimizer:
        from dpvision.engines.schedule import attach_schedule

        if self.name == "adam":
            optimizer = torch.optim.Adam(params, lr=self.lr)
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        attach_schedule(optimizer, base_lr=self.lr, schedule=self.schedule, warmup_steps=self.warmup_steps,
                        total_steps=self.total_steps)
        return optimizer


@dataclass
class EpochResult:
    loss: float  # mean training loss over the examples seen this epoch
    accuracy: float  # fraction of those examples classified correctly
    steps: int  # optimizer steps taken (each one is a privacy step under DP)
    examples: int  # examples seen (a Binomial(N, q) draw per step under DP)


class Engine(ABC):
    """One way of running epochs. Subclasses set ``model``, ``optimizer``, ``sample_rate``."""

    name: str
    model: nn.Module  # the plain module: use it for evaluation and saving

    def __init__(self, *, train_data: ImageTensors, batch_size: int, dp: DPSettings | None,
                 seed: int, device: torch.device) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size (--batch-size) must be >= 1, got {batch_size}")
        self.train_data = train_data
        self.batch_size = batch_size
        self.dp = dp
        self.seed = seed
        self.device = torch.device(device)
        self.num_examples = len(train_data)
        # Under DP: Opacus's Poisson rate and epoch length. Without DP: shuffled
        # batches of size B, so the same number of steps an epoch.
        self.sample_rate = poisson_sample_rate(self.num_examples, batch_size)
        self.steps_per_epoch = steps_per_epoch(self.sample_rate) if dp else math.ceil(self.num_examples / batch_size)

    @abstractmethod
    def train_epoch(self, *, max_steps: int | None = None, progress: ProgressFn | None = None) -> EpochResult:
        """Run one epoch (at most ``max_steps`` steps of it) and return what it did."""

    @abstractmethod
    def _generators(self) -> dict[str, torch.Generator]:
        """Every generator the engine draws from, by name (saved and restored with the state)."""

    def state_dict(self) -> dict:
        """Model, optimizer and every generator: enough to continue bit for bit. Distributed, every
        rank's generators are gathered, so every rank must call it."""
        from dpvision.engines.distributed import engine_state

        common = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        return engine_state(self.dist, common, self._generators())

    def load_state_dict(self, state: dict | None) -> None:
        """Distributed, every rank must call it; rank 0's ``state`` is used (others pass ``None``)."""
        from dpvision.engines.distributed import load_engine_state

        state = load_engine_state(self.dist, state, self._generators())
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])



class UnsupportedModelError(ValueError):
    """The fast engine cannot train this model (``build_engine`` falls back to Opacus)."""

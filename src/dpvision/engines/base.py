"""The engine interface: what one epoch of training is, what every engine is built from, the registry.

An engine owns one epoch of training: sampling batches, per-example clipping,
noise and the optimizer step. The job (:mod:`dpvision.jobs`) owns everything
around it: evaluation, metrics, privacy ledger, run folders.

Every number of the run (q, steps per epoch, E[B], σ, C, the clipping rule, the
schedule's length) comes from one :class:`~dpvision.privacy.plan.Plan`, made once by
the caller; an engine reads it and never re-derives any of them. With ``plan.dp``
false an engine trains with plain SGD on ceil(N / B) shuffled batches; otherwise it
runs DP-SGD (Poisson sampling at q, per-example clipping to C, Gaussian noise of std
σC on the sum, division by E[B]).

Engines register themselves by name (``@register_engine("fast")``); ``build_engine``
looks them up in ``ENGINE_REGISTRY``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dpvision.data.tensors import ImageTensors
from dpvision.engines.distributed import DistContext, engine_state, load_engine_state
from dpvision.engines.evaluation import evaluate  # noqa: F401 (part of the engine interface)
from dpvision.engines.schedule import attach_schedule
from dpvision.privacy.plan import Plan

OPTIMIZERS = ("sgd", "adam")
ENGINE_REGISTRY: dict[str, type["Engine"]] = {}

ProgressFn = Callable[[int], None]  # called with the number of steps just done
# Where an engine trains: a device (one process), or this rank's DistContext (data-parallel, on its device).
Device = torch.device | str | DistContext


def register_engine(name: str) -> Callable[[type], type]:
    """Class decorator: the engine class becomes ``ENGINE_REGISTRY[name]`` (and its ``name``)."""

    def register(cls: type) -> type:
        cls.name = name
        ENGINE_REGISTRY[name] = cls
        return cls

    return register


@dataclass(kw_only=True, frozen=True)
class OptimizerSpec:
    """The torch optimizer an engine builds, and its learning-rate schedule (per step).

    The schedule's length (total and warm-up steps) comes from the plan given to :meth:`build`.
    """

    name: str = "sgd"
    lr: float
    momentum: float = 0.0  # SGD only
    schedule: str = "constant"  # or "cosine" (to 0 over plan.total_steps)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if not self.lr >= 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")

    def build(self, params, plan: Plan) -> torch.optim.Optimizer:
        if self.name == "adam":
            optimizer = torch.optim.Adam(params, lr=self.lr)
        else:
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)
        attach_schedule(optimizer, base_lr=self.lr, schedule=self.schedule, warmup_steps=plan.warmup_steps,
                        total_steps=plan.total_steps)
        return optimizer


@dataclass
class EpochResult:
    loss: float  # mean training loss over the examples seen this epoch
    accuracy: float  # fraction of those examples classified correctly
    steps: int  # optimizer steps taken (each one is a privacy step under DP)
    examples: int  # examples seen (a Binomial(N, q) draw per step under DP)


class Engine(ABC):
    """One way of running epochs. Subclasses set ``model`` (the plain module) and ``optimizer``."""

    name: str
    fallback: str | None = None  # the engine build_engine uses when this one raises UnsupportedModelError
    model: nn.Module  # the plain module: use it for evaluation and saving
    optimizer: torch.optim.Optimizer

    def __init__(self, *, train_data: ImageTensors, plan: Plan, seed: int, device: Device) -> None:
        if len(train_data) != plan.num_train:
            raise ValueError(f"train_data has {len(train_data)} examples, the plan was made for {plan.num_train}")
        self.train_data = train_data
        self.plan = plan
        self.seed = seed
        # One process: a world of one on ``device``; data-parallel: this rank's context and its device.
        self.dist = device if isinstance(device, DistContext) else DistContext(device=torch.device(device))
        self.device = self.dist.device
        self.last_batch_sizes: list[int] = []  # sampled (global) batch size of each step of the last epoch

    # The plan's numbers, for callers that hold only the engine.
    @property
    def sample_rate(self) -> float:
        return self.plan.sample_rate

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @abstractmethod
    def train_epoch(self, *, max_steps: int | None = None, progress: ProgressFn | None = None) -> EpochResult:
        """Run one epoch (at most ``max_steps`` steps of it) and return what it did."""

    @abstractmethod
    def _generators(self) -> dict[str, torch.Generator]:
        """Every generator the engine draws from, by name (saved and restored with the state)."""

    def state_dict(self) -> dict:
        """Model, optimizer and every generator: enough to continue bit for bit. Distributed, every
        rank's generators are gathered, so every rank must call it."""
        common = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        return engine_state(self.dist, common, self._generators())

    def load_state_dict(self, state: dict | None) -> None:
        """Distributed, every rank must call it; rank 0's ``state`` is used (others pass ``None``)."""
        state = load_engine_state(self.dist, state, self._generators())
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


class UnsupportedModelError(ValueError):
    """The fast engine cannot train this model (``build_engine`` falls back to Opacus)."""

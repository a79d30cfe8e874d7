"""The training engine interface and the stock Opacus engine.

An engine owns one epoch of training: sampling batches, per-example clipping,
noise and the optimizer step. The job (``dpvision.mnist``, the CelebA trainer)
owns everything around it: evaluation, metrics, privacy ledger, run folders.

DP is one wrapping call: with ``dp=None`` an engine trains with plain SGD on
shuffled batches; with ``DPSettings`` the stock engine wraps model, optimizer
and data loader with Opacus's ``PrivacyEngine.make_private`` (Poisson
sampling, per-sample clipping to C, Gaussian noise of std σC on the sum).

Example:
    >>> engine = build_engine("opacus", model=SampleConvNet(), train_data=data,   # doctest: +SKIP
    ...                       batch_size=256, optimizer=OptimizerSpec(lr=0.15),
    ...                       dp=DPSettings(noise_multiplier=1.3, max_grad_norm=1.0), seed=0)
    >>> result = engine.train_epoch()                                             # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dpvision.data.tensors import ImageTensors, NormalizedTensorDataset
from dpvision.privacy.accounting import poisson_sample_rate, steps_per_epoch
from dpvision.seeding import make_generator

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
    name: str = "sgd"
    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if not self.lr >= 0:
            raise ValueError(f"lr (--lr) must be >= 0, got {self.lr}")

    def build(self, params) -> torch.optim.Optimizer:
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


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
    def state_dict(self) -> dict:
        """Model, optimizer and every generator state: enough to continue bit for bit."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...


class OpacusEngine(Engine):
    """The stock recipe: a DataLoader, ``PrivacyEngine.make_private``, hook-based per-sample gradients."""

    name = "opacus"

    def __init__(self, *, model: nn.Module, train_data: ImageTensors, batch_size: int,
                 optimizer: OptimizerSpec, dp: DPSettings | None, seed: int,
                 device: torch.device | str = "cpu", num_workers: int = 0) -> None:
        super().__init__(train_data=train_data, batch_size=batch_size, dp=dp, seed=seed, device=device)
        model = model.to(self.device)
        self.order_generator = make_generator(seed, "sampling" if dp else "data_order")
        self.noise_generator = make_generator(seed, "noise", self.device)
        loader = DataLoader(NormalizedTensorDataset(train_data), batch_size=batch_size,
                            shuffle=dp is None, generator=self.order_generator, num_workers=num_workers)
        opt = optimizer.build(model.parameters())
        if dp is None:
            self.model, self.optimizer, self.loader, self._wrapped = model, opt, loader, model
            return
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator

        ModuleValidator.validate(model, strict=True)
        # Opacus's hooks fire on the first layer although its inputs need no grad: harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        # The accountant inside PrivacyEngine is not used for reporting: the job's
        # PrivacyLedger records the steps actually taken (same history format).
        self.privacy_engine = PrivacyEngine(accountant="rdp")
        wrapped, opt, loader = self.privacy_engine.make_private(
            module=model, optimizer=opt, data_loader=loader,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True, noise_generator=self.noise_generator,
        )
        assert abs(1 / len(loader) - self.sample_rate) < 1e-15, "Opacus and dpvision disagree on q"
        self.model, self.optimizer, self.loader, self._wrapped = model, opt, loader, wrapped

    def train_epoch(self, *, max_steps: int | None = None, progress: ProgressFn | None = None) -> EpochResult:
        self._wrapped.train()
        total_loss, correct, seen, steps = 0.0, 0, 0, 0
        for images, labels in self.loader:
            if max_steps is not None and steps >= max_steps:
                break
            images, labels = images.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            logits = self._wrapped(images)  # [B, classes]
            loss = F.cross_entropy(logits, labels)
            loss.backward()
            self.optimizer.step()  # clip, noise, average, update (under DP)
            steps += 1
            if len(labels):
                total_loss += float(loss.detach()) * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                seen += len(labels)
            if progress:
                progress(1)
        return EpochResult(loss=total_loss / max(seen, 1), accuracy=correct / max(seen, 1), steps=steps, examples=seen)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "order_generator": self.order_generator.get_state(),
            "noise_generator": self.noise_generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.order_generator.set_state(state["order_generator"])
        self.noise_generator.set_state(state["noise_generator"])


FAST_ONLY_OPTIONS = ("physical_batch_size", "grad_sample_mode", "cuda_graphs", "static_shapes")  # dropped on fallback
AUDIT_OPTIONS = ("canary_gradients", "noise_scale_for_testing")  # fast engine only, never dropped


def build_engine(name: str, **kwargs) -> Engine:
    """The engine called ``name`` (``"fast"`` or ``"opacus"``); keyword arguments as for ``OpacusEngine``.

    ``"fast"`` falls back to the stock Opacus engine, with a notice on stderr, when
    it does not support the model (its own speed options are then ignored).
    """
    if name == "opacus":
        return OpacusEngine(**kwargs)
    if name == "fast":
        from dpvision.training.fast import FastEngine, UnsupportedModelError, fallback_notice  # noqa: PLC0415

        try:
            return FastEngine(**kwargs)
        except UnsupportedModelError as err:
            if any(kwargs.get(k) not in (None, 1.0) for k in AUDIT_OPTIONS):
                raise
            fallback_notice(err)
            return OpacusEngine(**{k: v for k, v in kwargs.items() if k not in FAST_ONLY_OPTIONS + AUDIT_OPTIONS})
    raise ValueError(f"engine (--engine) must be one of {ENGINES}, got {name!r}")


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageTensors, *, batch_size: int = 1024,
             device: torch.device | str = "cpu") -> tuple[float, float, torch.Tensor]:
    """Mean loss, accuracy and predictions [N] of ``model`` on ``data``."""
    was_training = model.training
    model.eval()
    total_loss, predictions = 0.0, []
    for start in range(0, len(data), batch_size):
        images = data.normalize(data.images[start:start + batch_size].to(device))  # [b, C, H, W]
        labels = data.labels[start:start + batch_size].to(device)
        logits = model(images)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        predictions.append(logits.argmax(1).cpu())
    model.train(was_training)
    predictions = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    accuracy = float((predictions == data.labels).float().mean()) if len(data) else float("nan")
    return total_loss / max(len(data), 1), accuracy, predictions

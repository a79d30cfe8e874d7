"""The stock Opacus engine: a DataLoader, ``PrivacyEngine.make_private``, hook-based per-sample gradients.

Example:
    >>> engine = OpacusEngine(model=SampleConvNet(), train_data=data, batch_size=256,   # doctest: +SKIP
    ...                       optimizer=OptimizerSpec(lr=0.15),
    ...                       dp=DPSettings(noise_multiplier=1.3, max_grad_norm=1.0), seed=0)
    >>> result = engine.train_epoch()                                                   # doctest: +SKIP
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dpvision.data.tensors import ImageTensors, NormalizedTensorDataset
from dpvision.engines.base import DPSettings, Engine, EpochResult, OptimizerSpec, ProgressFn
from dpvision.privacy.accounting import expected_batch_size
from dpvision.seeding import make_generator


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
        assert loader.sample_rate == self.sample_rate and len(loader) == self.steps_per_epoch, \
            "Opacus and dpvision disagree on q or on the steps of an epoch"
        # make_private divides by int(N * (1 / len(loader))) in floating point: one too small where len(loader)
        # divides N (N = 49, B = 1: 0, so NaN weights), and len(loader) = int(1 / (1/m)) is m - 1 for some
        # m = ceil(N/B) (93, 99, ...). Use the fast engine's exact N // m; assert Opacus was off only by that.
        exact = self.num_examples // len(loader)
        assert opt.expected_batch_size == exact or (
            opt.expected_batch_size == exact - 1 and self.num_examples % len(loader) == 0), \
            f"Opacus's expected batch size {opt.expected_batch_size} is not N // len(loader) = {exact}"
        opt.expected_batch_size = expected_batch_size(self.num_examples, self.sample_rate)
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



"""The stock Opacus engine: a DataLoader, ``PrivacyEngine.make_private``, hook-based per-sample gradients.

Its options are Opacus's: the fast engine's speed options (``FastOptions``) and clipping rules
other than ``flat`` are refused with one line (audit instruments plug into the fast engine only).
q, the epoch length and E[B] come from the plan; Opacus's own loader is asserted to agree with it.

Example:
    >>> plan = make_plan(DPSettings(noise_multiplier=1.3, max_grad_norm=1.0),         # doctest: +SKIP
    ...                  num_train=len(data), batch_size=256, epochs=1)
    >>> engine = OpacusEngine(model=SampleConvNet(), train_data=data, plan=plan,      # doctest: +SKIP
    ...                       optimizer=OptimizerSpec(lr=0.15), seed=0)
    >>> result = engine.train_epoch()                                                 # doctest: +SKIP

Data-parallel (``device=`` this rank's :class:`~dpvision.engines.distributed.DistContext` of several
ranks): the model is wrapped in Opacus's ``DPDDP`` and ``make_private`` returns its
``DistributedDPOptimizer`` (rank 0 alone adds the noise; the sums are all-reduced). The
loader is dpvision's :class:`~dpvision.engines.distributed.ShardPoissonBatchSampler`,
not Opacus's distributed sampler, which skips a rank's empty batch and so would put the
ranks out of step (:mod:`dpvision.engines.distributed`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from opacus import PrivacyEngine
from opacus.data_loader import wrap_collate_with_empty
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.optimizers import DistributedDPOptimizer
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from dpvision.data.tensors import ImageTensors, NormalizedTensorDataset
from dpvision.engines.base import Device, Engine, EpochResult, OptimizerSpec, ProgressFn, register_engine
from dpvision.engines.distributed import (
    ShardPoissonBatchSampler, ShardShuffleBatchSampler, all_reduce_grads_, reduce_epoch_totals,
)  # fmt: skip
from dpvision.engines.options import FastOptions
from dpvision.privacy.plan import Plan
from dpvision.seeding import make_generator


@register_engine("opacus")
class OpacusEngine(Engine):
    """The stock recipe: a DataLoader, ``PrivacyEngine.make_private``, hook-based per-sample gradients."""

    def __init__(self, *, model: nn.Module, train_data: ImageTensors, plan: Plan, optimizer: OptimizerSpec,
                 seed: int, device: Device = "cpu", options: FastOptions | None = None) -> None:
        if options is not None and not options.is_default():
            raise ValueError(f"{', '.join(options.given())}: fast engine options; the opacus engine takes none")
        if plan.dp and plan.clipping != "flat":
            raise ValueError(f"clipping must be flat for the opacus engine, got {plan.clipping!r}")
        super().__init__(train_data=train_data, plan=plan, seed=seed, device=device)
        if self.dist.is_distributed:
            self._init_distributed(model, optimizer)
            return
        model = model.to(self.device)
        self.order_generator = make_generator(seed, "sampling" if plan.dp else "data_order")
        self.noise_generator = make_generator(seed, "noise", self.device)
        loader = DataLoader(NormalizedTensorDataset(train_data), batch_size=plan.batch_size,
                            shuffle=not plan.dp, generator=self.order_generator)
        opt = optimizer.build(model.parameters(), plan)
        if not plan.dp:
            self.model, self.optimizer, self.loader, self._wrapped = model, opt, loader, model
            return
        self._make_private(model, opt, loader)

    def _make_private(self, model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader) -> None:
        """Opacus's ``make_private`` (Poisson loader, DPOptimizer), checked against the plan."""
        plan = self.plan
        ModuleValidator.validate(model, strict=True)
        _quiet_opacus()
        # The accountant inside PrivacyEngine is not used for reporting: the job's
        # PrivacyLedger records the steps actually taken (same history format).
        self.privacy_engine = PrivacyEngine(accountant="rdp")
        wrapped, opt, loader = self.privacy_engine.make_private(
            module=model, optimizer=opt, data_loader=loader,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True, noise_generator=self.noise_generator,
        )
        assert loader.sample_rate == plan.sample_rate and len(loader) == plan.steps_per_epoch, \
            "Opacus and the plan disagree on q or on the steps of an epoch"
        # make_private divides by int(N * (1 / len(loader))) in floating point: one too small where len(loader)
        # divides N (N = 49, B = 1: 0, so NaN weights), and len(loader) = int(1 / (1/m)) is m - 1 for some
        # m = ceil(N/B) (93, 99, ...). Use the plan's exact E[B] = N // m; assert Opacus was off only by that.
        exact = plan.num_train // len(loader)
        assert opt.expected_batch_size == exact or (
            opt.expected_batch_size == exact - 1 and plan.num_train % len(loader) == 0), \
            f"Opacus's expected batch size {opt.expected_batch_size} is not N // len(loader) = {exact}"
        opt.expected_batch_size = plan.expected_batch_size
        self.model, self.optimizer, self.loader, self._wrapped = model, opt, loader, wrapped

    def train_epoch(self, *, max_steps: int | None = None, progress: ProgressFn | None = None) -> EpochResult:
        if self.dist.is_distributed:
            return self._train_epoch_distributed(max_steps, progress)
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

    def _generators(self) -> dict[str, torch.Generator]:
        return {"order_generator": self.order_generator, "noise_generator": self.noise_generator}

    # ----------------------------------------------------------------- data-parallel
    def _init_distributed(self, model: nn.Module, optimizer: OptimizerSpec) -> None:
        """Several ranks: this rank's loader, and under DP ``DPDDP`` + ``make_private`` (noise on rank 0 only)."""
        dist, plan = self.dist, self.plan
        model = model.to(self.device)
        dist.broadcast_module_(model)  # every rank starts from rank 0's weights
        dataset = NormalizedTensorDataset(self.train_data)
        self.noise_generator = make_generator(self.seed, "noise", self.device)  # drawn from by rank 0 only
        opt = optimizer.build(model.parameters(), plan)
        if not plan.dp:  # one shared shuffled order; the loader yields this rank's slice of each batch
            self.order_generator = make_generator(self.seed, "data_order")
            sampler = ShardShuffleBatchSampler(num_examples=plan.num_train, batch_size=plan.batch_size, dist=dist,
                                               generator=self.order_generator)
            self.loader = DataLoader(dataset, batch_sampler=sampler, generator=self.order_generator)
            self.model, self.optimizer, self._wrapped = model, opt, model
            return
        ModuleValidator.validate(model, strict=True)
        _quiet_opacus()
        self.order_generator = make_generator(self.seed, dist.stream("sampling"))  # this rank's own stream
        sampler = ShardPoissonBatchSampler(num_examples=plan.num_train, sample_rate=plan.sample_rate,
                                           steps=plan.steps_per_epoch, dist=dist, generator=self.order_generator)
        image, _ = dataset[0]
        collate = wrap_collate_with_empty(collate_fn=default_collate,  # an empty batch keeps its shapes
                                          sample_empty_shapes=[(0, *image.shape), (0,)],
                                          dtypes=[image.dtype, torch.int64])
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=self.order_generator)
        self.privacy_engine = PrivacyEngine(accountant="rdp")  # not used for reporting (the job's ledger is)
        # poisson_sampling=False: the loader above already Poisson-samples this rank's shard at q.
        wrapped, opt, loader = self.privacy_engine.make_private(
            module=DPDDP(model), optimizer=opt, data_loader=loader,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            poisson_sampling=False, noise_generator=self.noise_generator,
        )
        wrapped.forbid_grad_accumulation()  # as make_private does with poisson_sampling=True
        assert isinstance(opt, DistributedDPOptimizer), f"expected Opacus's DistributedDPOptimizer, got {type(opt)}"
        # DistributedDPOptimizer divides each rank's (noised on rank 0) sum by expected_batch_size, all-reduces,
        # and divides by W: with E / W here, the update is (sum of all clipped grads + noise) / E, E = the plan's.
        opt.expected_batch_size = plan.expected_batch_size / dist.world_size
        self.model, self.optimizer, self.loader, self._wrapped = model, opt, loader, wrapped

    def _train_epoch_distributed(self, max_steps: int | None, progress: ProgressFn | None) -> EpochResult:
        self._wrapped.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        total_loss, correct, seen, steps = 0.0, 0, 0, 0
        for images, labels in self.loader:  # every rank gets a batch (maybe empty) every step
            if max_steps is not None and steps >= max_steps:
                break
            images, labels = images.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            logits = self._wrapped(images)  # [b, classes], b = this rank's part of the batch
            if self.plan.dp:
                loss = F.cross_entropy(logits, labels)  # Opacus's hooks undo the mean: per-sample grads
                loss.backward()
                with self.dist.collective("DP optimizer step"):
                    self.optimizer.step()  # clip, noise (rank 0), / (E / W), all-reduce, / W, update
                loss_sum = float(loss.detach()) * len(labels) if len(labels) else 0.0
            else:
                b = self.plan.batch_size
                global_len = min(b, self.plan.num_train - steps * b)
                loss = F.cross_entropy(logits, labels, reduction="sum")
                (loss / global_len).backward()  # summed over ranks: the global batch's mean loss
                all_reduce_grads_(params, self.dist)
                self.optimizer.step()
                loss_sum = float(loss.detach())
            steps += 1
            total_loss += loss_sum
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            if progress:
                progress(1)
        total_loss, correct, seen = reduce_epoch_totals(self.dist, total_loss, correct, seen)
        return EpochResult(loss=total_loss / max(seen, 1), accuracy=correct / max(seen, 1), steps=steps, examples=seen)


def _quiet_opacus() -> None:
    """Opacus's hooks fire on the first layer although its inputs need no grad (harmless), and it warns that
    its secure RNG is off (the noise comes from the run's seeded generator, on purpose)."""
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")

"""The fast engine: DP-SGD with the data on the device and no host round trips.

Same mathematics as :class:`~dpvision.engines.OpacusEngine` (Poisson sampling at rate q every
step, per-example clipping to C by the plan's rule, one Gaussian draw of std σC on the clipped
sum, division by E[B], then the torch optimizer), organised for speed. Reading order:

* :mod:`~dpvision.engines.options`: the speed options and their defaults by device;
* :mod:`~dpvision.engines.placement`: the training set on the device as uint8, sharded under
  torch.distributed, normalised per chunk; the Poisson ``sampler``; the seeded generators;
* :mod:`~dpvision.engines.steps`: one DP step (clip, sum, noise once, / E[B]) and one plain step;
* :mod:`~dpvision.engines.graphs`: CUDA graphs of the chunks, and the probing of the per-sample
  backend and of the fused kernels;
* this module: the engine that puts them together and runs epochs.

An epoch under DP runs in blocks of steps: the block's Poisson masks and noise are drawn at once on
the device; the block's one host synchronisation reads the batch sizes, so every step's work is
known before it is issued. Every chunk has a static shape (:mod:`dpvision.engines.chunks`): the
sampled indices are padded with weight-0 slots to the next of a few bucket sizes (one CUDA graph
each, one shared memory pool), and a step whose batch overflows the capacity runs as several chunks
(nothing sampled is ever dropped), which also makes large logical batches fit in memory.

On the CPU generators a run is reproducible bit for bit: ``state_dict`` holds the model, the
optimizer and every generator. Without DP the engine trains on ceil(N / B) shuffled batches of
size B (mean loss), like the stock path.

Data-parallel (``device=`` this rank's :class:`~dpvision.engines.distributed.DistContext` of several ranks):
under DP each rank keeps only its shard ``r::W`` and Poisson-samples it at the global q; rank 0
alone adds the noise before the all-reduce of the flat sum; the divisor stays the global E[B].
Without DP each rank takes its slice of every shared shuffled batch and the gradients are
all-reduced. :mod:`dpvision.engines.distributed` explains why this is the single-device mechanism.

Audit instrumentation (:mod:`dpvision.engines.instrument`, one process only) plugs in through
``instrument=``; the parts an audit's test harness may swap are ``sampler``, ``clipping`` and
:meth:`FastEngine.noise_std`.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from dpvision.data.tensors import ImageTensors
from dpvision.engines.augmult import AugmultManual, AugmultPerSample
from dpvision.engines.base import (
    Device, Engine, EpochResult, OptimizerSpec, ProgressFn, UnsupportedModelError, register_engine,
)  # fmt: skip
from dpvision.engines.chunks import bucket_width, chunk_capacity, likely_sizes, plan_chunks
from dpvision.engines.clipping import get_clipping
from dpvision.engines.distributed import all_reduce_grads_, reduce_epoch_totals
from dpvision.engines.graphs import ChunkGraphs, Numerics, first_working_backend, fuse_checked
from dpvision.engines.instrument import Instrument, canary_rows
from dpvision.engines.options import FastOptions
from dpvision.engines.per_sample import BACKENDS
from dpvision.engines.placement import DeviceData, PoissonSampler, engine_generators
from dpvision.engines.steps import DPStep, PlainStep, flat_views
from dpvision.privacy.plan import Plan

BLOCK_ELEMENTS = 1 << 25  # random numbers drawn per block of steps (masks or noise), ~128 MiB float32


@register_engine("fast")
class FastEngine(Engine):
    """DP-SGD (or plain SGD) with device-resident data, static shapes and CUDA graphs.

    ``options``: the speed options (:class:`~dpvision.engines.options.FastOptions`, default by
    device); ``instrument``: an audit plug-in (:mod:`dpvision.engines.instrument`).
    """

    fallback = "opacus"  # build_engine's engine for the models this one does not support

    def __init__(self, *, model: nn.Module, train_data: ImageTensors, plan: Plan, optimizer: OptimizerSpec,
                 seed: int, device: Device = "cpu", options: FastOptions | None = None,
                 instrument: Instrument | None = None) -> None:
        super().__init__(train_data=train_data, plan=plan, seed=seed, device=device)
        if instrument is not None and (self.dist.is_distributed or not plan.dp):
            raise ValueError("an instrument needs DP in a single process")
        self.options = options if options is not None else FastOptions()
        self.settings = self.options.resolve(self.device, dp=plan.dp)
        self.clipping = get_clipping(plan.clipping)  # swappable: read at every chunk
        self.model = self._place_model(model)
        # Only the trainable parameters are clipped, noised and stepped (P counts them): frozen ones
        # (a linear probe's body) never change.
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (every requires_grad is False)")
        self.num_params = sum(p.numel() for p in self.params)
        self.optimizer = optimizer.build(self.params, plan)
        self.data = DeviceData.for_run(train_data, self.dist, dp=plan.dp, channels_last=self.settings.channels_last)
        augments = bool(self.settings.augmult) or self.settings.objective == "contrastive"
        self.generators = engine_generators(seed, self.dist, augment=augments)
        self.sampler = PoissonSampler(plan.sample_rate, self.generators["sampling_generator"])  # swappable
        self.last_local_batch_sizes: list[int] = []  # this rank's part of last_batch_sizes (distributed DP)
        self.fused_blocks = 0  # GroupNorm -> ReLU -> pool runs fused
        numerics = Numerics(self.settings.precision in ("tf32", "bf16"), self.settings.cudnn_benchmark)
        if plan.dp:
            self._setup_dp(numerics, instrument)
        else:
            self._setup_plain(numerics)
        self.graphs = ChunkGraphs(enabled=self.settings.cuda_graphs, params=self.params, state=self.step.state)

    def noise_std(self) -> float:
        """σC: the std of the one Gaussian draw added to each step's clipped sum (0 on ranks other than 0)."""
        return self.plan.noise_multiplier * self.plan.max_grad_norm if self.dist.is_main else 0.0

    # ----------------------------------------------------------------- construction
    def _place_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        self.dist.broadcast_module_(model)  # every rank starts from rank 0's weights
        if self.settings.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _setup_plain(self, numerics: Numerics) -> None:
        s = self.settings
        if s.objective == "contrastive" and self.dist.is_distributed:
            raise ValueError("the contrastive objective runs in one process (its negatives are the whole batch)")
        self.step = PlainStep(model=self.model, data=self.data, numerics=numerics, bf16=s.precision == "bf16",
                              augmult=s.augmult, augment_flip=s.augment_flip,
                              generator=self.generators.get("augment_generator"),
                              temperature=s.temperature if s.objective == "contrastive" else None)
        if s.fuse:
            self._fuse(None)

    def _setup_dp(self, numerics: Numerics, instrument: Instrument | None) -> None:
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise UnsupportedModelError(f"{type(module).__name__} mixes examples; DP needs per-example layers")
        s, q, local = self.settings, self.plan.sample_rate, len(self.data)
        # This rank's share of E[B] (the plan's E[B] in one process): it sizes the chunks, nothing else.
        local_expected = self.plan.expected_batch_size * local // self.plan.num_train
        self.chunk = chunk_capacity(local_expected, q, local, s.max_physical, s.pad_sigmas)
        self.bucket = bucket_width(local_expected, q) if s.bucket is None else s.bucket
        self._likely_sizes = likely_sizes(local_expected, q, self.chunk, self.bucket)
        self.instrument = instrument
        self.canaries = canary_rows(instrument, self.num_params, self.device)  # [m, P] raw rows, or None
        self._canary_norms = self.canaries.norm(dim=1) if self.canaries is not None else None  # [m]
        self._dp_steps = 0  # DP steps taken by this engine (the instrument's step number)
        self.grad_sample_mode, self.backend = first_working_backend(s.grad_sample_modes, self._make_backend,
                                                                    self._probe_backend)
        self.step = DPStep(params=self.params, data=self.data, backend=self.backend, clip=self._clip,
                           numerics=numerics, expected_batch_size=self.plan.expected_batch_size, dist=self.dist)
        if s.augmult and self.grad_sample_mode != s.grad_sample_modes[0]:
            print(f"notice: augmult: the {s.grad_sample_modes[0]} per-sample backend does not support this model; "
                  f"using {self.grad_sample_mode} (torch.func, slower)", file=sys.stderr)
        if s.fuse and self.grad_sample_mode == "manual":  # vmap/hooks need the modules themselves
            # The fused backward hands the backend each example's (or view's: summed) GroupNorm gradients [B, C].
            self._fuse(self.backend.group_norm_gradients)

    def _clip(self, norms: torch.Tensor) -> torch.Tensor:
        """Per-example factors [B] of the run's clipping rule at C, from norms [B]."""
        return self.clipping.factors(norms, self.plan.max_grad_norm)

    def _make_backend(self, mode: str):
        s = self.settings
        if s.augmult:  # K views of each example: the view-aware manual backend, or torch.func's vmap
            augmult = AugmultManual if mode == "manual" else AugmultPerSample
            backend = augmult(self.model, k=s.augmult, flip=s.augment_flip, generator=self.generators["augment_generator"])
        else:
            explicit = s.grad_sample_modes == ("manual",)  # a ViT's token rules: only when asked for (manual.py)
            backend = BACKENDS[mode](self.model, tokens=explicit) if mode == "manual" else BACKENDS[mode](self.model)
        if s.precision == "bf16" and hasattr(backend, "amp_dtype"):
            backend.amp_dtype = torch.bfloat16
        if hasattr(backend, "reduced_precision"):  # clip an upper bound of the fp32-rounded norm (.rounding)
            backend.reduced_precision = s.precision in ("tf32", "bf16")
        return backend

    def _probe_backend(self, backend) -> None:
        """One chunk of two examples into scratch buffers: raises where the backend cannot do this model."""
        dev = self.device
        probe = torch.arange(min(2, len(self.data)), device=dev)
        scratch = torch.zeros(self.num_params, device=dev)
        backend.accumulate(*self.data.batch(probe), torch.ones(len(probe), device=dev), self._clip,
                           flat_views(scratch, self.params), torch.zeros((), device=dev), torch.zeros((), device=dev))

    def _fuse(self, per_example) -> None:
        """Fused GroupNorm -> ReLU -> pool kernels where they run here, checked by one chunk of two examples."""
        probe = torch.arange(min(2, len(self.data)), device=self.device)
        streams = {name: g.get_state() for name, g in self.generators.items()}  # augmult's views draw from one

        def run_probe() -> None:
            try:
                if self.plan.dp:
                    self.step.chunk(probe)
                else:
                    self.step.chunk(probe, 1.0)
            finally:  # the probe leaves nothing behind: no gradients, no sums, no random numbers drawn
                for p in self.params:
                    p.grad = None
                for t in self.step.state():
                    t.zero_()
                for name, state in streams.items():
                    self.generators[name].set_state(state)

        self.fused_blocks = fuse_checked(self.model, per_example, run_probe)

    # ----------------------------------------------------------------- epochs
    def train_epoch(self, *, max_steps: int | None = None, progress: ProgressFn | None = None) -> EpochResult:
        self.model.train()
        per_epoch = self.plan.steps_per_epoch
        steps = per_epoch if max_steps is None else max(0, min(max_steps, per_epoch))
        self.step.loss_sum.zero_()
        self.step.correct.zero_()
        tracker = _Progress(progress, steps, every=1 if self.device.type == "cpu" else max(1, steps // 16))
        seen = self._dp_epoch(steps, tracker) if self.plan.dp else self._plain_epoch(steps, tracker)
        loss_sum, correct = (float(v) for v in torch.stack([self.step.loss_sum, self.step.correct]).cpu())
        if self.dist.is_distributed:  # this rank's sums -> the global ones, the same on every rank
            loss_sum, correct, seen = reduce_epoch_totals(self.dist, loss_sum, correct, seen)
        return EpochResult(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1), steps=steps, examples=seen)

    def _dp_epoch(self, steps: int, tracker: "_Progress") -> int:
        block = max(1, BLOCK_ELEMENTS // max(len(self.data), self.num_params))
        self.last_batch_sizes = []
        if self.graphs.enabled:  # the likely sizes' graphs, largest first: the shared pool is sized once
            for size in self._likely_sizes:
                if f"dp{size}" not in self.graphs.graphs and self.graphs.enabled:
                    self.graphs.try_capture(f"dp{size}", self.step.chunk,
                                            torch.full((size,), -1, device=self.device), pool=True)
        done = seen = 0
        while done < steps:
            counts = self._dp_block(min(block, steps - done), tracker)
            done += len(counts)
            seen += sum(counts)
            self.last_batch_sizes.extend(counts)
        if self.dist.is_distributed:
            self.last_local_batch_sizes = self.last_batch_sizes
            sizes = torch.tensor(self.last_batch_sizes, dtype=torch.int64, device=self.device)  # [steps]
            self.last_batch_sizes = self.dist.all_reduce_sum_(sizes).tolist()
        return seen

    def _dp_block(self, steps: int, tracker: "_Progress") -> list[int]:
        """``steps`` DP steps whose masks and noise are drawn at once; returns their (local) batch sizes."""
        masks = self.sampler.draw(steps, len(self.data))  # [S, n]
        included = canary_factors = None
        if self.canaries is not None:  # sampled like the examples, clipped by the run's rule
            included = self.sampler.draw(steps, len(self.canaries))  # [S, m]
            self.instrument.on_inclusions(included)
            canary_factors = self._clip(self._canary_norms)  # [m]
        noise, std = None, self.noise_std()
        if std > 0:
            noise = torch.randn(steps, self.num_params, generator=self.generators["noise_generator"],
                                device=self.device)
            noise.mul_(std)  # [S, P]
        counts = masks.sum(1).tolist()  # the block's one host synchronisation
        run_chunks = self._block_chunks(masks, counts)
        for s in range(steps):
            self.step.acc.zero_()
            run_chunks(s)  # none for an empty step: its sum is 0
            canary_weights = included[s].float() * canary_factors if included is not None else None
            update = self.step.finish(None if noise is None else noise[s], self.canaries, canary_weights)
            if self.instrument is not None:
                self.instrument.on_update(self._dp_steps, update)
            self.optimizer.step()
            self._dp_steps += 1
            tracker.advance()
        return counts

    def _block_chunks(self, masks: torch.Tensor, counts: list[int]):
        """A function running step s's chunks of the block whose masks [S, n] and batch sizes are given."""
        flat_idx = masks.nonzero()[:, 1]  # [sum counts], by step then index
        static = self.settings.static_shapes
        chunks = plan_chunks(counts, self.chunk, self.bucket if static else 0)
        chunk_idx = None
        if static and chunks:  # [chunks, capacity] sampled indices, -1 after each chunk's length
            arange = torch.arange(self.chunk, device=self.device)  # [capacity]
            starts = torch.tensor([c.start for c in chunks], device=self.device).unsqueeze(1)
            lens = torch.tensor([c.length for c in chunks], device=self.device).unsqueeze(1)
            chunk_idx = torch.where(arange < lens, flat_idx[(starts + arange).clamp(max=len(flat_idx) - 1)], -1)
        by_step: dict[int, list[int]] = {}
        for k, c in enumerate(chunks):
            by_step.setdefault(c.step, []).append(k)

        def run(s: int) -> None:
            for k in by_step.get(s, ()):
                c = chunks[k]
                if static:  # padded with -1 to its bucket: one graph per size
                    self.graphs.run(f"dp{c.size}", self.step.chunk, chunk_idx[k, :c.size], pool=True)
                else:  # eager: no padding needed, the exact examples
                    self.step.chunk(flat_idx[c.start:c.start + c.length])

        return run

    def _plain_epoch(self, steps: int, tracker: "_Progress") -> int:
        b, n = self.plan.batch_size, self.plan.num_train
        self.last_batch_sizes = [min(b, n - s * b) for s in range(steps)]
        order = torch.randperm(n, generator=self.generators["data_order_generator"], device=self.device)
        seen, physical = 0, self.settings.max_physical
        if self.settings.objective == "contrastive":  # the batch's views are one another's negatives: one chunk
            physical = b
        for s in range(steps):
            idx = order[s * b:(s + 1) * b]  # the global batch
            full, scale = len(idx) == b, 1.0 / len(idx)  # mean over the global batch
            if self.dist.is_distributed:
                idx = idx[self.dist.rank::self.dist.world_size]  # this rank's slice [~B / W]
            if self.graphs.enabled and full and 0 < len(idx) <= physical:
                # The captured backward writes (not adds) the gradients: no zeroing needed.
                self.graphs.run(f"plain{len(idx)}", lambda i, scale=scale: self.step.chunk(i, scale), idx)
            else:
                self._zero_grads()
                for start in range(0, len(idx), physical):
                    self.step.chunk(idx[start:start + physical], scale)
            if self.dist.is_distributed:
                all_reduce_grads_(self.params, self.dist)
            self.optimizer.step()
            seen += len(idx)
            tracker.advance()
        return seen

    def _zero_grads(self) -> None:
        """Graph-owned .grad tensors are zeroed in place (the graphs keep their addresses); else dropped."""
        self.optimizer.zero_grad(set_to_none=not self.graphs.graphs)
        if self.graphs.graphs:
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()

    # ----------------------------------------------------------------- state
    def _generators(self) -> dict[str, torch.Generator]:
        return self.generators


class _Progress:
    """Calls ``fn(steps done since the last call)`` every ``every`` steps and at the last one."""

    def __init__(self, fn: ProgressFn | None, total: int, every: int) -> None:
        self.fn, self.total, self.every, self.done, self.reported = fn, total, every, 0, 0

    def advance(self) -> None:
        self.done += 1
        if self.fn is not None and (self.done - self.reported >= self.every or self.done == self.total):
            self.fn(self.done - self.reported)
            self.reported = self.done

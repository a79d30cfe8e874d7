"""The fast engine: DP-SGD with the data on the device and no host round trips.

Same mathematics as :class:`~dpvision.engines.OpacusEngine` (Poisson
sampling at rate q every step, per-sample clipping to C with Opacus's flat
factor min(1, C / (norm + 1e-6)), one Gaussian draw of std σC on the clipped
sum, division by the expected batch size int(N q), then the torch optimizer),
organised for speed:

* the training set sits on the device as uint8 and is normalised per chunk;
* the Poisson masks (and the noise) of a block of steps are drawn at once on the
  device from the run's own generators; the one host synchronisation of a block
  reads the batch sizes, so every step's work is known before it is issued;
* every chunk has a static shape (:mod:`dpvision.engines.chunks`): the sampled
  indices are padded with weight-0 slots to the next of a few bucket sizes (one
  CUDA graph each, one shared memory pool), and a step whose batch overflows the
  capacity runs as several chunks (nothing sampled is ever dropped), which also
  makes large logical batches fit in memory (gradients accumulate over chunks);
* per-sample gradients come from ``torch.func.vmap(grad)`` (or Opacus's hooks,
  see :mod:`dpvision.engines.per_sample`), clipped and summed in one pass into
  one flat buffer; on CUDA the whole chunk (gather, forward, per-sample backward,
  clipping, accumulation, metrics) is one captured CUDA graph.

On the CPU generators, a run is reproducible bit for bit: ``state_dict`` holds
the model, the optimizer and every generator. Without DP, the engine trains on
shuffled batches of size B (ceil(N / B) steps), mean loss, like the stock path.

Data-parallel (``dist=`` a :class:`~dpvision.engines.distributed.DistContext` of
several ranks): under DP each rank keeps only its shard ``r::W`` on its device and
Poisson-samples it at the global q; rank 0 alone adds the noise to its clipped sum
before the all-reduce of the flat sum; the divisor stays int(N q) with the global N.
Without DP each rank takes its slice of every shared shuffled batch and the gradients
are all-reduced. :mod:`dpvision.engines.distributed` explains why this is exactly the
single-device mechanism.

Test/audit hooks (both off by default, and free when off):

* ``canary_gradients`` [m, P] (P = number of model parameters, flattened in
  ``model.parameters()`` order, each row of norm <= C): m extra "examples" whose
  clipped per-sample gradient is that row. Each step each row is included
  independently with probability ``sample_rate`` (drawn from the sampling
  generator) and added to the clipped sum before the noise. The inclusions of
  the last epoch are kept in ``canary_included`` [steps, m] (bool).
* ``noise_scale_for_testing``: multiplies the noise std (e.g. 0.01 for a
  deliberately broken run).
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dpvision.data.tensors import ImageTensors
from dpvision.privacy.accounting import expected_batch_size
from dpvision.seeding import make_generator
from dpvision.engines.base import DPSettings, Engine, EpochResult, OptimizerSpec, ProgressFn, UnsupportedModelError
from dpvision.engines.augmult import AugmultPerSample, augment
from dpvision.engines.chunks import PAD_SIGMAS, bucket_width, chunk_capacity, likely_sizes, plan_chunks
from dpvision.engines.distributed import (
    DistContext, all_reduce_grads_, reduce_epoch_totals, shard_indices,
)  # fmt: skip
from dpvision.engines.fused import fuse_blocks, unfuse_blocks
from dpvision.engines.per_sample import BACKENDS

# Per-sample gradient backend by device type, chosen from measurements (benchmarks/NOTES.md).
# First choice, then the fallback when the first does not support the model.
DEFAULT_GRAD_SAMPLE_MODE = {"cpu": ("manual", "vmap"), "cuda": ("manual", "vmap")}
# Largest physical chunk by device type (examples whose per-sample gradients coexist).
DEFAULT_MAX_PHYSICAL = {"cpu": 512, "cuda": 4096}
BLOCK_ELEMENTS = 1 << 25  # random numbers drawn per block of steps (masks or noise), ~128 MiB float32
# Numerics of the per-chunk work by device type (benchmarks/NOTES.md, docs/performance.md):
# "fp32" (matmuls/einsums in full fp32), "tf32" (TF32 tensor cores for matmuls/einsums, scoped
# to the engine's chunks), "bf16" (autocast of forward/backward and the per-sample weight-gradient
# einsums to bfloat16; clipping norms, noise and accumulation stay fp32). The CPU is always exact fp32.
PRECISIONS = ("fp32", "tf32", "bf16")
# CUDA: TF32 (-5% CelebA-64 epoch, update within 5e-3 of fp32, same accuracy); bf16 and channels-last
# were slower on the H100 (GroupNorm/max-pool are NCHW fp32 kernels: extra casts/copies), so both are opt-in.
DEFAULT_PRECISION = {"cpu": "fp32", "cuda": "tf32"}
DEFAULT_CHANNELS_LAST = {"cpu": False, "cuda": False}


class FastEngine(Engine):
    """DP-SGD (or plain SGD) with device-resident data, static shapes and CUDA graphs.

    Keywords as for ``OpacusEngine`` (``num_workers`` is ignored), plus:
        physical_batch_size: most examples per chunk (default 512 on CPU, 4096 on CUDA).
        grad_sample_mode: ``"vmap"`` or ``"hooks"`` (default by device, see ``DEFAULT_GRAD_SAMPLE_MODE``).
        cuda_graphs: capture each chunk as a CUDA graph (default: on CUDA with ``vmap``).
        static_shapes: pad every chunk to a bucket size (default: when graphs are on).
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"`` (CUDA only; default ``DEFAULT_PRECISION``; the CPU
            always runs fp32). ``"bf16"`` needs the manual backend (else it runs as ``"tf32"``).
        channels_last: model and inputs in channels-last memory format (CUDA only; default by device).
        cudnn_benchmark: let cuDNN time its algorithms for every conv shape of the engine's chunks (CUDA
            only; scoped to the chunks, default off: the search's trial workspaces raise the peak memory).
        pad_sigmas: chunk capacity = E[B] + pad_sigmas sd (default ``PAD_SIGMAS``); overflow -> extra chunk.
        bucket: padded chunk sizes are multiples of this (default ``chunks.bucket_width``: about sd / 2);
            0 pads every chunk to the capacity (one graph; the engine before buckets).
        canary_gradients, noise_scale_for_testing: test/audit hooks (module docstring; one process only).
        dist: the data-parallel context (default: one process); ``device`` must be ``dist.device``.
        augmult: K > 0 trains on K random augmentations of every sampled example, their gradients averaged
            before clipping (:mod:`dpvision.engines.augmult`: same sensitivity, same accounting); eager only.
        augment_flip: random horizontal flips among the augmentations (not for digits).
        fuse: run each GroupNorm -> ReLU -> MaxPool2d(2) of an ``nn.Sequential`` as one Triton kernel per
            direction (:mod:`dpvision.engines.fused`; default: on CUDA; without DP or with the manual backend).
    """

    name = "fast"

    def __init__(self, *, model: nn.Module, train_data: ImageTensors, batch_size: int,
                 optimizer: OptimizerSpec, dp: DPSettings | None, seed: int,
                 device: torch.device | str = "cpu", num_workers: int = 0,
                 physical_batch_size: int | None = None, grad_sample_mode: str | None = None,
                 cuda_graphs: bool | None = None, canary_gradients: torch.Tensor | None = None,
                 noise_scale_for_testing: float = 1.0, static_shapes: bool | None = None,
                 precision: str | None = None, channels_last: bool | None = None,
                 pad_sigmas: float | None = None, bucket: int | None = None, cudnn_benchmark: bool = False,
                 dist: DistContext | None = None, augmult: int = 0, augment_flip: bool = False,
                 fuse: bool | None = None) -> None:
        super().__init__(train_data=train_data, batch_size=batch_size, dp=dp, seed=seed, device=device)
        del num_workers  # no loader: the data is on the device
        dev = self.device
        self.dist = dist if dist is not None else DistContext(device=dev)
        if self.dist.is_distributed:
            if dev != self.dist.device:
                raise ValueError(f"device {dev} is not this rank's device {self.dist.device} (pass device=dist.device)")
            if canary_gradients is not None or noise_scale_for_testing != 1.0:
                raise ValueError("canary_gradients and noise_scale_for_testing need a single process")
        kind = dev.type if dev.type in DEFAULT_MAX_PHYSICAL else "cpu"
        if physical_batch_size is not None and physical_batch_size < 1:
            raise ValueError(f"physical_batch_size must be >= 1, got {physical_batch_size}")
        self.augmult, self.augment_flip = int(augmult), bool(augment_flip)
        # K views of every example coexist in memory: K times fewer examples per chunk.
        self.max_physical = max(1, (physical_batch_size or DEFAULT_MAX_PHYSICAL[kind]) // max(1, self.augmult))
        modes = (grad_sample_mode,) if grad_sample_mode else DEFAULT_GRAD_SAMPLE_MODE[kind]
        if any(m not in BACKENDS for m in modes):
            raise ValueError(f"grad_sample_mode must be one of {tuple(BACKENDS)}, got {grad_sample_mode!r}")
        self.grad_sample_mode = modes[0]
        self.use_graphs = (dev.type == "cuda" and (not dp or "hooks" not in modes)
                           if cuda_graphs is None else bool(cuda_graphs) and dev.type == "cuda")
        self.use_graphs = self.use_graphs and not self.augmult  # the augmentations draw fresh randomness
        # Static shapes (padded chunks) are what graphs need; eager runs skip the padding.
        self.static_shapes = self.use_graphs if static_shapes is None else bool(static_shapes) or self.use_graphs
        if self.use_graphs and dp and self.grad_sample_mode == "hooks":
            raise ValueError("cuda_graphs do not work with grad_sample_mode='hooks' (Opacus's Python-side state)")

        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        # Speed options that change numerics are CUDA-only: CPU runs stay exact (and bit-reproducible).
        self.precision = (precision or DEFAULT_PRECISION[kind]) if dev.type == "cuda" else "fp32"
        self.channels_last = (DEFAULT_CHANNELS_LAST[kind] if channels_last is None else bool(channels_last)) \
            and dev.type == "cuda"
        self.pad_sigmas = PAD_SIGMAS if pad_sigmas is None else float(pad_sigmas)
        self.cudnn_benchmark = bool(cudnn_benchmark) and dev.type == "cuda"
        # Fused blocks change only the rounding (float32 sums in another order): CUDA by default, the CPU
        # only when asked (tests, under TRITON_INTERPRET=1), so CPU runs stay bit for bit as before.
        self.fuse = dev.type == "cuda" if fuse is None else bool(fuse)
        self.fused_blocks = 0  # GroupNorm -> ReLU -> pool runs fused (set below)

        self.model = model.to(dev)
        self.dist.broadcast_module_(self.model)  # every rank starts from rank 0's weights
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if len(self.params) != len(list(self.model.parameters())):
            raise UnsupportedModelError("the fast engine trains every parameter (found frozen ones)")
        self.num_params = sum(p.numel() for p in self.params)
        self.optimizer = optimizer.build(self.model.parameters())

        # Distributed DP: this rank's shard only (rank::W), local index i is example shard[i]. Without DP
        # every rank needs the whole set: its slice of a shuffled global batch can be anywhere.
        self.shard = None
        images, labels = train_data.images, train_data.labels
        if self.dist.is_distributed and dp is not None:
            self.shard = shard_indices(self.num_examples, rank=self.dist.rank, world_size=self.dist.world_size)
            images, labels = images[self.shard], labels[self.shard]
        self.images = images.to(dev)  # uint8 [n, C, H, W], n = N or this rank's shard
        self.labels = labels.to(dev)  # int64 [n]
        self._mean = torch.tensor(train_data.mean, device=dev).view(1, -1, 1, 1)
        self._std = torch.tensor(train_data.std, device=dev).view(1, -1, 1, 1)

        self.sampling_generator = make_generator(seed, self.dist.stream("sampling"), dev)  # per rank
        self.data_order_generator = make_generator(seed, "data_order", dev)  # shared: one global order
        self.noise_generator = make_generator(seed, "noise", dev)  # drawn from by rank 0 only
        self.augment_generator = make_generator(seed, self.dist.stream("augment"), dev) if self.augmult else None
        self._loss_sum = torch.zeros((), device=dev)
        self._correct = torch.zeros((), device=dev)
        self._graphs: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # the DP chunk graphs' shared memory pool (they never run concurrently)
        self._warmup_stream = None
        self.noise_scale_for_testing = float(noise_scale_for_testing)
        self.canary_gradients = None
        self.canary_included: torch.Tensor | None = None
        self.last_batch_sizes: list[int] = []  # sampled (global) batch size of each step of the last epoch
        self.last_local_batch_sizes: list[int] = []  # this rank's part of them (distributed DP)
        self.backend = None

        if dp is None:
            if canary_gradients is not None:
                raise ValueError("canary_gradients need DP (dp=DPSettings(...))")
            self.chunk = min(batch_size, self.max_physical)
            if self.fuse and not self.augmult:
                self._fuse(None)
            return

        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise UnsupportedModelError(f"{type(module).__name__} mixes examples; DP needs per-example layers")
        self.expected_batch = expected_batch_size(self.num_examples, self.sample_rate)  # the global divisor
        local = len(self.images)  # N in one process
        local_expected = expected_batch_size(local, self.sample_rate)
        self.chunk = chunk_capacity(local_expected, self.sample_rate, local, self.max_physical, self.pad_sigmas)
        if bucket is not None and bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0: no buckets), got {bucket}")
        self.bucket = bucket_width(local_expected, self.sample_rate) if bucket is None else int(bucket)
        self._likely_sizes = likely_sizes(local_expected, self.sample_rate, self.chunk, self.bucket)
        # One flat gradient: the optimizer reads views of it, the clipped sum is accumulated into _acc.
        self._acc = torch.zeros(self.num_params, device=dev)
        self._flat_grad = torch.zeros(self.num_params, device=dev)
        self._acc_views = self._views(self._acc)
        self._grad_views = self._views(self._flat_grad)
        if canary_gradients is not None:
            canary = torch.as_tensor(canary_gradients, dtype=torch.float32).to(dev)
            if canary.dim() != 2 or canary.shape[1] != self.num_params:
                raise ValueError(f"canary_gradients must be [m, {self.num_params}], got {tuple(canary.shape)}")
            if bool((canary.norm(dim=1) > dp.max_grad_norm * (1 + 1e-5)).any()):
                raise ValueError(f"every canary gradient needs norm <= C = {dp.max_grad_norm}")
            self.canary_gradients = canary
        failures = []
        if self.augmult:  # per-example gradients of the mean loss over K views (torch.func)
            modes = ("augmult",)
        for mode in modes:
            try:
                self.backend = (AugmultPerSample(self.model, k=self.augmult, flip=self.augment_flip,
                                                 generator=self.augment_generator) if mode == "augmult"
                                else BACKENDS[mode](self.model))
                if self.precision == "bf16" and hasattr(self.backend, "amp_dtype"):
                    self.backend.amp_dtype = torch.bfloat16
                probe = torch.arange(min(2, len(self.images)), device=dev)
                scratch = torch.zeros(self.num_params, device=dev)
                self.backend.accumulate(self._normalize(self.images[probe]), self.labels[probe],
                                        torch.ones(len(probe), device=dev), dp.max_grad_norm,
                                        self._views(scratch), torch.zeros((), device=dev), torch.zeros((), device=dev))
                self.grad_sample_mode = mode
                break
            except Exception as err:  # noqa: BLE001 (any failure of the per-sample path means "not supported")
                if self.backend is not None:
                    self.backend.close()
                    self.backend = None
                failures.append(f"{mode}: {err}")
        if self.backend is None:
            raise UnsupportedModelError("per-sample gradients failed (" + "; ".join(failures) + ")")
        if self.fuse and self.grad_sample_mode == "manual":  # vmap/hooks/augmult need the modules themselves
            # The fused backward hands the backend each example's GroupNorm gradients [B, C].
            self._fuse(self.backend.group_norm_gradients)

    def _fuse(self, per_example) -> None:
        """Fuse the model's GroupNorm -> ReLU -> pool runs, checked by one chunk of two examples: where the
        kernels do not compile or run here (a GPU Triton cannot build for, say), the modules stay, with a warning."""
        self.fused_blocks = fuse_blocks(self.model, per_example=per_example)
        if not self.fused_blocks:
            return
        probe = torch.arange(min(2, len(self.images)), device=self.device)
        try:
            if self.dp is None:
                self._plain_chunk(probe, 1.0)
            else:
                self._dp_chunk(probe)
        except Exception as err:  # noqa: BLE001 (any failure: the modules are the safe path)
            unfuse_blocks(self.model)
            self.fused_blocks = 0
            warnings.warn(f"fused GroupNorm kernels failed here ({type(err).__name__}: {err}); running the modules",
                          stacklevel=3)
        finally:  # the probe leaves nothing behind
            for p in self.params:
                p.grad = None
            for t in self._state_tensors():
                t.zero_()

    # ----------------------------------------------------------------- helpers
    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset:offset + p.numel()])  # [numel]
            offset += p.numel()
        return views

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W] -> float, exactly as ``ImageTensors.normalize``."""
        x = (images.float().div_(255.0) - self._mean) / self._std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def _numerics(self):
        """Context of one chunk's work: TF32 matmuls for "tf32"/"bf16" (restored afterwards, not global)."""
        return _Numerics(self.precision in ("tf32", "bf16"), self.cudnn_benchmark)

    def _run(self, key: str, fn, idx: torch.Tensor, pool: bool = False) -> None:
        """``fn(static_idx)``, replayed from a CUDA graph captured on first use when graphs are on."""
        if self.use_graphs and key not in self._graphs:
            self._try_capture(key, fn, idx, pool)
        if not self.use_graphs:
            fn(idx)
            return
        graph, static_idx = self._graphs[key]
        static_idx.copy_(idx)
        graph.replay()

    def _try_capture(self, key: str, fn, idx: torch.Tensor, pool: bool) -> None:
        try:
            self._graphs[key] = self._capture(fn, idx, pool)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"CUDA graph capture failed ({err}); running eagerly", stacklevel=3)
            self.use_graphs = False

    def _capture(self, fn, idx: torch.Tensor, pool: bool):
        """Capture ``fn`` with its own static index buffer; ``pool``: in the shared pool of the DP chunks.

        Sharing is safe in any replay order: every tensor a DP chunk's graph reads from or writes to
        outside itself (data, index buffer, accumulators, parameters) lives outside the pool, so a
        graph only ever overwrites another's temporaries."""
        static_idx = idx.clone()
        saved = [t.clone() for t in self._state_tensors()]
        if self._warmup_stream is None:  # one side stream for every warm-up: its cached blocks are reused
            self._warmup_stream = torch.cuda.Stream()
        stream = self._warmup_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: cuDNN/cuBLAS handles and workspaces
                fn(static_idx)
        torch.cuda.current_stream().wait_stream(stream)
        for p in self.params:  # a captured backward must assign, not add to, the gradients
            p.grad = None
        if pool and self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool if pool else None):
            fn(static_idx)
        for t, s in zip(self._state_tensors(), saved):  # undo the warm-up's accumulation
            t.copy_(s)
        return graph, static_idx

    def _state_tensors(self) -> list[torch.Tensor]:
        out = [self._loss_sum, self._correct]
        if self.dp is not None:
            out.append(self._acc)
        return out

    def _progress(self, progress: ProgressFn | None, done: int, total: int, last: list[int]) -> None:
        if progress is None:
            return
        every = 1 if self.device.type == "cpu" else max(1, total // 16)
        if done - last[0] >= every or done == total:
            progress(done - last[0])
            last[0] = done

    # ----------------------------------------------------------------- epochs
    def train_epoch(self, *, max_steps: int | None = None, progress: ProgressFn | None = None) -> EpochResult:
        self.model.train()
        steps = self.steps_per_epoch if max_steps is None else max(0, min(max_steps, self.steps_per_epoch))
        self._loss_sum.zero_()
        self._correct.zero_()
        seen = self._dp_epoch(steps, progress) if self.dp else self._plain_epoch(steps, progress)
        loss_sum, correct = (float(v) for v in torch.stack([self._loss_sum, self._correct]).cpu())
        if self.dist.is_distributed:  # this rank's sums -> the global ones, the same on every rank
            loss_sum, correct, seen = reduce_epoch_totals(self.dist, loss_sum, correct, seen)
        return EpochResult(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1), steps=steps, examples=seen)

    def _dp_chunk(self, idx: torch.Tensor) -> None:
        """Accumulate the clipped per-sample gradients of chunk ``idx`` [P] (-1 = padding) into ``_acc``."""
        weights = (idx >= 0).float()  # [P]
        safe = idx.clamp(min=0)
        with self._numerics():
            self.backend.accumulate(self._normalize(self.images[safe]), self.labels[safe], weights,
                                    self.dp.max_grad_norm, self._acc_views, self._loss_sum, self._correct)

    def _dp_epoch(self, steps: int, progress: ProgressFn | None) -> int:
        n, dev, q = len(self.images), self.device, self.sample_rate  # n: N, or this rank's shard
        std = self.dp.noise_multiplier * self.dp.max_grad_norm * self.noise_scale_for_testing
        if not self.dist.is_main:
            std = 0.0  # noise once: rank 0's draw goes into the all-reduced sum
        block = max(1, BLOCK_ELEMENTS // max(n, self.num_params))
        seen, done, last = 0, 0, [0]
        canary_masks, self.last_batch_sizes = [], []
        arange = torch.arange(self.chunk, device=dev)  # [capacity]
        if self.use_graphs:  # the likely sizes' graphs, largest first: the shared pool is sized once
            for size in self._likely_sizes:
                if f"dp{size}" not in self._graphs and self.use_graphs:
                    self._try_capture(f"dp{size}", self._dp_chunk, torch.full((size,), -1, device=dev), pool=True)
        while done < steps:
            s_block = min(block, steps - done)
            masks = torch.rand(s_block, n, generator=self.sampling_generator, device=dev) < q  # [S, N]
            canary = None
            if self.canary_gradients is not None:
                m = len(self.canary_gradients)
                canary = torch.rand(s_block, m, generator=self.sampling_generator, device=dev) < q  # [S, m]
                canary_masks.append(canary)
            noise = None
            if std > 0:
                noise = torch.randn(s_block, self.num_params, generator=self.noise_generator, device=dev)
                noise.mul_(std)  # [S, P]
            counts = masks.sum(1).tolist()  # the block's one host synchronisation
            flat_idx = masks.nonzero()[:, 1]  # [sum counts], by step then index
            chunks = plan_chunks(counts, self.chunk, self.bucket if self.static_shapes else 0)
            chunk_idx = None
            if self.static_shapes and chunks:  # [chunks, capacity] sampled indices, -1 after each chunk's length
                starts = torch.tensor([c.start for c in chunks], device=dev).unsqueeze(1)
                lens = torch.tensor([c.length for c in chunks], device=dev).unsqueeze(1)
                chunk_idx = torch.where(arange < lens, flat_idx[(starts + arange).clamp(max=len(flat_idx) - 1)], -1)
            k = 0
            for s in range(s_block):
                self._acc.zero_()
                while k < len(chunks) and chunks[k].step == s:  # none for an empty step: its sum is 0
                    c = chunks[k]
                    if self.static_shapes:  # padded with -1 to its bucket: one graph per size
                        self._run(f"dp{c.size}", self._dp_chunk, chunk_idx[k, :c.size], pool=True)
                    else:  # eager: no padding needed, the exact examples
                        self._dp_chunk(flat_idx[c.start:c.start + c.length])
                    k += 1
                if canary is not None:
                    self._acc.addmv_(self.canary_gradients.t(), canary[s].float())
                if self.dist.is_distributed:
                    if noise is not None:  # rank 0 only
                        self._acc.add_(noise[s])
                    self.dist.all_reduce_sum_(self._acc)  # the global clipped sum + one noise draw
                    self._flat_grad.copy_(self._acc)
                elif noise is not None:
                    torch.add(self._acc, noise[s], out=self._flat_grad)
                else:
                    self._flat_grad.copy_(self._acc)
                self._flat_grad.div_(self.expected_batch)
                for p, g in zip(self.params, self._grad_views):
                    p.grad = g.view_as(p)
                self.optimizer.step()
                done += 1
                self._progress(progress, done, steps, last)
            seen += sum(counts)
            self.last_batch_sizes.extend(counts)
        if self.canary_gradients is not None:
            self.canary_included = torch.cat(canary_masks) if canary_masks else None
        if self.dist.is_distributed:
            self.last_local_batch_sizes = self.last_batch_sizes
            sizes = torch.tensor(self.last_batch_sizes, dtype=torch.int64, device=dev)  # [steps]
            self.last_batch_sizes = self.dist.all_reduce_sum_(sizes).tolist()
        return seen

    def _plain_chunk(self, idx: torch.Tensor, scale: float) -> None:
        with self._numerics(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                              enabled=self.precision == "bf16"):
            x, labels, k = self._normalize(self.images[idx]), self.labels[idx], max(1, self.augmult)
            if self.augmult:  # K views of each example, each weighing 1/K
                x = augment(x, k=k, flip=self.augment_flip, generator=self.augment_generator).flatten(0, 1)
                labels = labels.repeat_interleave(k)  # [b K]
            logits = self.model(x).float()  # [b K, classes]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        (loss * (scale / k)).backward()
        with torch.no_grad():
            self._loss_sum.add_(loss.detach() / k)
            self._correct.add_((logits.argmax(1) == labels).sum() / k)

    def _plain_epoch(self, steps: int, progress: ProgressFn | None) -> int:
        self.last_batch_sizes = [len(range(s * self.batch_size, min((s + 1) * self.batch_size, self.num_examples)))
                                 for s in range(steps)]
        order = torch.randperm(self.num_examples, generator=self.data_order_generator, device=self.device)
        b, seen, last = self.batch_size, 0, [0]
        for s in range(steps):
            idx = order[s * b:(s + 1) * b]  # the global batch
            full, scale = len(idx) == b, 1.0 / len(idx)  # mean over the global batch
            if self.dist.is_distributed:
                idx = idx[self.dist.rank::self.dist.world_size]  # this rank's slice [~B / W]
            if self.use_graphs and full and 0 < len(idx) <= self.max_physical:
                # The captured backward writes (not adds) the gradients: no zeroing needed.
                self._run(f"plain{len(idx)}", lambda i, scale=scale: self._plain_chunk(i, scale), idx)
            else:
                self.optimizer.zero_grad(set_to_none=not self._graphs)
                if self._graphs:  # graph-owned .grad tensors: zero in place, keep their addresses
                    for p in self.params:
                        if p.grad is not None:
                            p.grad.zero_()
                for start in range(0, len(idx), self.max_physical):
                    self._plain_chunk(idx[start:start + self.max_physical], scale)
            if self.dist.is_distributed:
                all_reduce_grads_(self.params, self.dist)
            self.optimizer.step()
            seen += len(idx)
            self._progress(progress, s + 1, steps, last)
        return seen

    # ----------------------------------------------------------------- state
    def _generators(self) -> dict[str, torch.Generator]:
        generators = {"sampling_generator": self.sampling_generator,
                      "data_order_generator": self.data_order_generator, "noise_generator": self.noise_generator}
        if self.augment_generator is not None:
            generators["augment_generator"] = self.augment_generator
        return generators



class _Numerics:
    """Sets ``torch.backends.cuda.matmul.allow_tf32`` (and cuDNN's benchmark mode) for a block and restores
    them afterwards: the engine's choices never leak into the rest of the program."""

    def __init__(self, tf32: bool, cudnn_benchmark: bool) -> None:
        self.tf32, self.cudnn_benchmark = tf32, cudnn_benchmark

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark
        if self.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
        if self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        return self

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = self.saved


def fallback_notice(err: Exception) -> None:
    print(f"notice: the fast engine does not support this model ({err}); using the stock Opacus engine",
          file=sys.stderr)

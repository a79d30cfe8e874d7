"""The fast engine's speed options: what a user may set (:class:`FastOptions`) and what a device makes of them.

:class:`FastOptions` holds the options as given (``None``: the device's default) and checks
each value in ``__post_init__``. :meth:`FastOptions.resolve` is the one place the defaults
by device are chosen (``benchmarks/NOTES.md``, ``docs/performance.md`` have the measurements)
and the options that cannot apply are switched off; the engine reads only the resolved
:class:`Resolved`.

Speed options that change numerics are CUDA-only: CPU runs stay exact fp32 and reproducible bit
for bit.

Example:
    >>> settings = FastOptions(precision="bf16").resolve(torch.device("cpu"), dp=True)
    >>> settings.precision, settings.max_physical, settings.grad_sample_modes, settings.cuda_graphs
    ('fp32', 512, ('manual', 'vmap'), False)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dpvision.engines.chunks import PAD_SIGMAS
from dpvision.engines.contrastive import OBJECTIVES, resolve_temperature
from dpvision.engines.manual import KEPT_AMP_MAX_EXAMPLES
from dpvision.engines.per_sample import BACKENDS

# Per-sample gradient backend by device type: first choice, then the fallback when the first
# does not support the model.
DEFAULT_GRAD_SAMPLE_MODE = {"cpu": ("manual", "vmap"), "cuda": ("manual", "vmap")}
# Largest physical chunk by device type (examples whose per-sample gradients coexist).
DEFAULT_MAX_PHYSICAL = {"cpu": 512, "cuda": 4096}
# Under augmult with K >= 2 on CUDA, by default at most 512 examples a chunk (and at most DEFAULT_MAX_PHYSICAL views:
# K = 2 / 4: 1,024 / 2,048 views, K = 16: 256 examples): there the kept per-example gradients come from the bf16
# operands (manual.KEPT_AMP_MAX_EXAMPLES). H100, WRN-16-4, bf16, bench_augmult.py, one run each (session 13): K = 2
# 23.6k views/s in chunks of 512 examples against 13.7k in chunks of 256; K = 4 26.2k against 22.2k; K = 16 keeps
# 256 (4,096 views; 37.4k against 34.9k in chunks of 512). Session 10: K = 4 in chunks of 256 examples 26.6k views/s
# against 17.9k in 4,096-view ones. K = 1 keeps its 4,096-view chunks (15.1k views/s against 14.4k in chunks of 256).
DEFAULT_AUGMULT_EXAMPLES = {"cpu": None, "cuda": KEPT_AMP_MAX_EXAMPLES}
AUGMULT_EXAMPLES_MIN_K = 2
# Numerics of the per-chunk work: "fp32" (matmuls/einsums in full fp32), "tf32" (TF32 tensor cores
# for matmuls/einsums, scoped to the engine's chunks), "bf16" (autocast of forward/backward and the
# per-sample weight-gradient einsums to bfloat16; clipping norms, noise and accumulation stay fp32).
PRECISIONS = ("fp32", "tf32", "bf16")
# CUDA: TF32 (-5% CelebA-64 epoch, update within 5e-3 of fp32, same accuracy); bf16 and channels-last
# were slower on the H100 (GroupNorm/max-pool are NCHW fp32 kernels: extra casts/copies): opt-in.
DEFAULT_PRECISION = {"cpu": "fp32", "cuda": "tf32"}


@dataclass(frozen=True, kw_only=True)
class FastOptions:
    """The fast engine's options as given; ``None`` picks the device's default (:meth:`resolve`).

    physical_batch_size: most examples per chunk (default 512 on CPU, 4096 on CUDA); with ``augmult`` most views
        (K views an example: physical // K examples; on CUDA with K >= 2, by default at most 512 examples).
    grad_sample_mode: ``"manual"``, ``"vmap"`` or ``"hooks"`` (:mod:`dpvision.engines.per_sample`).
    cuda_graphs: capture each chunk as a CUDA graph (default: on CUDA unless ``hooks``).
    static_shapes: pad every chunk to a bucket size (default: when graphs are on; graphs need it).
    precision: ``"fp32"``, ``"tf32"`` or ``"bf16"`` (CUDA only; ``bf16`` needs the manual backend).
    channels_last: model and inputs in channels-last memory format (CUDA only; default off).
    pad_sigmas: chunk capacity = E[B] + pad_sigmas sd (default ``chunks.PAD_SIGMAS``).
    bucket: padded chunk sizes are multiples of this (default about sd / 2; 0: always the capacity).
    cudnn_benchmark: cuDNN times its algorithms for the chunks' shapes (CUDA only; raises peak memory).
    fuse: GroupNorm -> ReLU -> MaxPool2d(2), and WideResNet's ReLU -> GroupNorm, as Triton kernels
        (:mod:`dpvision.engines.fused`; default: on CUDA; without DP or with the manual backend).
    augmult: K > 0 trains on K augmentations of every sampled example, their gradients averaged before
        clipping (:mod:`dpvision.engines.augmult`: same sensitivity, same accounting); eager only. Under DP
        the manual backend's view-aware path where it supports the model, else torch.func vmap.
    augment_flip: random horizontal flips among the augmentations (not for digits).
    objective: ``"cross_entropy"`` or, without DP and in one process only, ``"contrastive"``
        (:mod:`dpvision.engines.contrastive`: two strong views of each example, SimCLR's loss over the views of
        the whole batch, one chunk, at ``temperature``, default 0.5); eager only.
    """

    physical_batch_size: int | None = None
    grad_sample_mode: str | None = None
    cuda_graphs: bool | None = None
    static_shapes: bool | None = None
    precision: str | None = None
    channels_last: bool | None = None
    pad_sigmas: float | None = None
    bucket: int | None = None
    cudnn_benchmark: bool = False
    fuse: bool | None = None
    augmult: int = 0
    augment_flip: bool = False
    objective: str = "cross_entropy"
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.physical_batch_size is not None and self.physical_batch_size < 1:
            raise ValueError(f"physical_batch_size must be >= 1, got {self.physical_batch_size}")
        if self.grad_sample_mode is not None and self.grad_sample_mode not in BACKENDS:
            raise ValueError(f"grad_sample_mode must be one of {tuple(BACKENDS)}, got {self.grad_sample_mode!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.pad_sigmas is not None and not self.pad_sigmas >= 0:
            raise ValueError(f"pad_sigmas must be >= 0, got {self.pad_sigmas}")
        if self.bucket is not None and self.bucket < 0:
            raise ValueError(f"bucket must be >= 0 (0: no buckets), got {self.bucket}")
        if not (isinstance(self.augmult, int) and self.augmult >= 0):
            raise ValueError(f"augmult must be an integer >= 0, got {self.augmult!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "contrastive" and self.augmult:
            raise ValueError("the contrastive objective draws its own two views: augmult must be 0")
        if self.temperature is not None and not (self.objective == "contrastive" and self.temperature > 0):
            raise ValueError(f"temperature must be > 0 and needs the contrastive objective, got {self.temperature!r}")

    def is_default(self) -> bool:
        """Nothing set: what the stock Opacus engine accepts."""
        return self == FastOptions()

    def given(self) -> list[str]:
        """The names of the options set to something other than their default."""
        default = FastOptions()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]

    def resolve(self, device: torch.device, *, dp: bool) -> "Resolved":
        """The settings the engine runs with on ``device`` (defaults chosen, inapplicable options off)."""
        kind = device.type if device.type in DEFAULT_MAX_PHYSICAL else "cpu"
        cuda = device.type == "cuda"
        modes = (self.grad_sample_mode,) if self.grad_sample_mode else DEFAULT_GRAD_SAMPLE_MODE[kind]
        if self.augmult and dp and "hooks" in modes:  # the mean over K views: manual or torch.func only
            raise ValueError("augmult needs grad_sample_mode 'manual' or 'vmap' (not 'hooks')")
        graphs = cuda and (not dp or "hooks" not in modes) if self.cuda_graphs is None else self.cuda_graphs and cuda
        if self.objective == "contrastive" and dp:
            raise ValueError("the contrastive objective has no per-example gradients: it trains without DP only")
        # The augmentations (and the contrastive views) draw fresh randomness every step: eager.
        graphs = bool(graphs) and not self.augmult and self.objective == "cross_entropy"
        if graphs and dp and modes[0] == "hooks":
            raise ValueError("cuda_graphs do not work with grad_sample_mode='hooks' (Opacus's Python-side state)")
        # physical_batch_size counts views (memory): K views of every example coexist, K times fewer examples.
        physical = self.physical_batch_size or DEFAULT_MAX_PHYSICAL[kind]
        examples = max(1, physical // max(1, self.augmult))
        if self.augmult >= AUGMULT_EXAMPLES_MIN_K and not self.physical_batch_size and DEFAULT_AUGMULT_EXAMPLES[kind]:
            examples = min(examples, DEFAULT_AUGMULT_EXAMPLES[kind])
        return Resolved(
            max_physical=examples, grad_sample_modes=modes, cuda_graphs=graphs,
            # Static shapes (padded chunks) are what graphs need; eager runs skip the padding.
            static_shapes=graphs if self.static_shapes is None else bool(self.static_shapes) or graphs,
            precision=(self.precision or DEFAULT_PRECISION[kind]) if cuda else "fp32",
            channels_last=bool(self.channels_last) and cuda,
            pad_sigmas=PAD_SIGMAS if self.pad_sigmas is None else float(self.pad_sigmas), bucket=self.bucket,
            cudnn_benchmark=self.cudnn_benchmark and cuda,
            # Fused blocks change only the rounding (float32 sums in another order): CUDA by default, the
            # CPU only when asked (tests, under TRITON_INTERPRET=1), so CPU runs stay bit for bit.
            fuse=cuda if self.fuse is None else self.fuse, augmult=self.augmult, augment_flip=self.augment_flip,
            objective=self.objective,
            temperature=resolve_temperature(self.temperature))


@dataclass(frozen=True, kw_only=True)
class Resolved:
    """The fast engine's settings on one device (from :meth:`FastOptions.resolve`)."""

    max_physical: int
    grad_sample_modes: tuple[str, ...]  # tried in order; the first that supports the model is used
    cuda_graphs: bool
    static_shapes: bool
    precision: str
    channels_last: bool
    pad_sigmas: float
    bucket: int | None  # None: chunks.bucket_width of the run's E[B]
    cudnn_benchmark: bool
    fuse: bool
    augmult: int
    augment_flip: bool
    objective: str
    temperature: float

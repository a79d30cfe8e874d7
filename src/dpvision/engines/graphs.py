"""CUDA graphs of the fast engine's chunks, the numerics of a chunk, and the probing of its kernels.

* :class:`ChunkGraphs`: ``run(key, fn, idx)`` calls ``fn(idx)``, or, with graphs on, replays a CUDA
  graph of it captured on first use (one per key: a chunk kind and size). The DP chunks' graphs share
  one memory pool; a failed capture switches graphs off with a warning (eager from then on).
* :class:`Numerics`: TF32 matmuls (and cuDNN's benchmark mode) for one chunk's work, restored after.
* :func:`first_working_backend` and :func:`fuse_checked`: the per-sample gradient backend and the
  fused GroupNorm kernels are each tried on one chunk of two examples at construction; what fails
  here is not used (an error naming every backend's failure / a warning and the plain modules).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from dpvision.engines.base import UnsupportedModelError
from dpvision.engines.fused import PerExample, fuse_blocks, unfuse_blocks

ChunkFn = Callable[[torch.Tensor], None]  # one chunk's work on the index buffer [size]


class ChunkGraphs:
    """Chunk functions, eager or replayed from CUDA graphs captured on first use.

    ``state`` returns the tensors the chunks accumulate into (loss sum, number correct, the clipped
    sum): a capture's warm-up runs are undone on them.
    """

    def __init__(self, *, enabled: bool, params: list[torch.Tensor],
                 state: Callable[[], list[torch.Tensor]]) -> None:
        self.enabled = enabled
        self.params = params
        self.state = state
        self.graphs: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # the DP chunk graphs' shared memory pool (they never run concurrently)
        self._warmup_stream = None

    def run(self, key: str, fn: ChunkFn, idx: torch.Tensor, pool: bool = False) -> None:
        """``fn(idx)``, replayed from the graph ``key`` (captured now if new) when graphs are on."""
        if self.enabled and key not in self.graphs:
            self.try_capture(key, fn, idx, pool)
        if not self.enabled:
            fn(idx)
            return
        graph, static_idx = self.graphs[key]
        static_idx.copy_(idx)
        graph.replay()

    def try_capture(self, key: str, fn: ChunkFn, idx: torch.Tensor, pool: bool) -> None:
        try:
            self.graphs[key] = self._capture(fn, idx, pool)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"CUDA graph capture failed ({err}); running eagerly", stacklevel=3)
            self.enabled = False

    def _capture(self, fn: ChunkFn, idx: torch.Tensor, pool: bool):
        """Capture ``fn`` with its own static index buffer; ``pool``: in the shared pool of the DP chunks.

        Sharing is safe in any replay order: every tensor a DP chunk's graph reads from or writes to
        outside itself (data, index buffer, accumulators, parameters) lives outside the pool, so a
        graph only ever overwrites another's temporaries."""
        static_idx = idx.clone()
        saved = [t.clone() for t in self.state()]
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
        if pool and self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool if pool else None):
            fn(static_idx)
        for t, s in zip(self.state(), saved):  # undo the warm-up's accumulation
            t.copy_(s)
        return graph, static_idx


class Numerics:
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


def first_working_backend(modes: tuple[str, ...], make: Callable[[str], object], probe: Callable[[object], None]):
    """``(mode, backend)`` of the first mode whose backend ``make(mode)`` runs ``probe(backend)``; else
    :class:`UnsupportedModelError` listing every mode's failure."""
    failures = []
    for mode in modes:
        backend = None
        try:
            backend = make(mode)
            probe(backend)
            return mode, backend
        except Exception as err:  # noqa: BLE001 (any failure of the per-sample path means "not supported")
            if backend is not None:
                backend.close()
            failures.append(f"{mode}: {err}")
    raise UnsupportedModelError("per-sample gradients failed (" + "; ".join(failures) + ")")


def fuse_checked(model: nn.Module, per_example: PerExample | None, probe: Callable[[], None]) -> int:
    """Fuse the model's GroupNorm -> ReLU -> pool runs and check them with ``probe()`` (one chunk): where
    the kernels do not compile or run here (a GPU Triton cannot build for, say), the modules stay, with a
    warning. Returns the number of fused blocks."""
    fused = fuse_blocks(model, per_example=per_example)
    if not fused:
        return 0
    try:
        probe()
    except Exception as err:  # noqa: BLE001 (any failure: the modules are the safe path)
        unfuse_blocks(model)
        warnings.warn(f"fused GroupNorm kernels failed here ({type(err).__name__}: {err}); running the modules",
                      stacklevel=3)
        return 0
    return fused

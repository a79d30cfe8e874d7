"""One optimizer step of the fast engine: the DP-SGD step and the plain one, chunk by chunk.

A step's batch runs as one or more chunks (:mod:`dpvision.engines.chunks`); each chunk's
function takes an index buffer and only adds into device tensors (no host synchronisation,
no Python state), so that :class:`~dpvision.engines.graphs.ChunkGraphs` can replay it from a
CUDA graph.

DP-SGD (:class:`DPStep`), the same mathematics as Opacus's ``DPOptimizer``:

1. every chunk adds ``sum_i w_i f_i g_i`` into one flat buffer ``acc`` [P] (P = number of
   trainable parameters, ``model.parameters()`` order), where g_i is example i's gradient, f_i its factor
   from the plan's clipping rule (:mod:`dpvision.engines.clipping`) and w_i 0 for padding slots;
2. :meth:`DPStep.finish` adds the included canary rows (audit instruments), then ONE Gaussian draw
   of std σC (rank 0 only; the sum is then all-reduced over ranks), divides by E[B] and hands the
   result to the optimizer as the parameters' ``.grad`` (views of one flat tensor).

Without DP (:class:`PlainStep`): the mean cross-entropy over the global batch, by ordinary backward
into ``.grad``; optionally over K augmented views of each example, or the contrastive objective's mean
loss over two strong views of each example (:mod:`dpvision.engines.contrastive`; the batch is one chunk,
its views one another's negatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpvision.engines import contrastive
from dpvision.engines.augmult import augment
from dpvision.engines.clipping import ClipFn
from dpvision.engines.distributed import DistContext
from dpvision.engines.graphs import Numerics
from dpvision.engines.placement import DeviceData


def flat_views(flat: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views [numel] of ``flat`` [P], one per parameter, in order."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset:offset + p.numel()])
        offset += p.numel()
    return views


class DPStep:
    """The clipped sum of a step's chunks, then the noisy average handed to the optimizer."""

    def __init__(self, *, params: list[torch.Tensor], data: DeviceData, backend, clip: ClipFn, numerics: Numerics,
                 expected_batch_size: int, dist: DistContext) -> None:
        self.params, self.data, self.clip, self.numerics = params, data, clip, numerics
        self.backend = backend  # per-sample gradients, clipped and summed (:mod:`dpvision.engines.per_sample`)
        self.expected_batch_size = expected_batch_size  # the global E[B]: the noisy sum's divisor
        self.dist = dist
        dev = data.images.device
        num_params = sum(p.numel() for p in params)
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev)
        # One flat gradient: the optimizer reads views of it, the clipped sum is accumulated into acc.
        self.acc = torch.zeros(num_params, device=dev)
        self.flat_grad = torch.zeros(num_params, device=dev)
        self.acc_views = flat_views(self.acc, params)
        self.grad_views = flat_views(self.flat_grad, params)

    def state(self) -> list[torch.Tensor]:
        """The tensors the chunks add into."""
        return [self.loss_sum, self.correct, self.acc]

    def chunk(self, idx: torch.Tensor) -> None:
        """Add the clipped per-example gradients of chunk ``idx`` [size] (-1 = padding) into ``acc``."""
        weights = (idx >= 0).float()  # [size]
        images, labels = self.data.batch(idx.clamp(min=0))
        with self.numerics:
            self.backend.accumulate(images, labels, weights, self.clip, self.acc_views, self.loss_sum, self.correct)

    def finish(self, noise: torch.Tensor | None, canaries: torch.Tensor | None = None,
               canary_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The step's update: (acc + canaries^T canary_weights + noise) / E[B], set as the parameters' grads.

        ``noise`` [P]: this step's draw of std σC (None on ranks other than 0, or at σ = 0);
        ``canaries`` [m, P] raw rows with ``canary_weights`` [m] (included x clipping factor).
        Returns the flat update [P] (the optimizer's ``.grad``, viewed)."""
        if canaries is not None:
            self.acc.addmv_(canaries.t(), canary_weights)
        if self.dist.is_distributed:
            if noise is not None:  # rank 0 only
                self.acc.add_(noise)
            self.dist.all_reduce_sum_(self.acc)  # the global clipped sum + one noise draw
            self.flat_grad.copy_(self.acc)
        elif noise is not None:
            torch.add(self.acc, noise, out=self.flat_grad)
        else:
            self.flat_grad.copy_(self.acc)
        self.flat_grad.div_(self.expected_batch_size)
        for p, g in zip(self.params, self.grad_views):
            p.grad = g.view_as(p)
        return self.flat_grad


class PlainStep:
    """Without DP: the batch's summed cross-entropy times ``scale`` (1 / global batch length), backward.

    ``temperature``: train the contrastive objective at this temperature instead (``generator`` draws its views).
    """

    def __init__(self, *, model: nn.Module, data: DeviceData, numerics: Numerics, bf16: bool,
                 augmult: int = 0, augment_flip: bool = False, generator: torch.Generator | None = None,
                 temperature: float | None = None) -> None:
        self.model, self.data, self.numerics, self.bf16 = model, data, numerics, bf16
        self.augmult, self.augment_flip, self.generator = augmult, augment_flip, generator
        self.temperature = temperature
        dev = data.images.device
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev)

    def state(self) -> list[torch.Tensor]:
        return [self.loss_sum, self.correct]

    def chunk(self, idx: torch.Tensor, scale: float) -> None:
        """Add the gradient of ``scale`` x the summed loss of examples ``idx`` [b] into ``.grad``."""
        if self.temperature is not None:
            return self._contrastive_chunk(idx, scale)
        k = max(1, self.augmult)
        with self.numerics, torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x, labels = self.data.batch(idx)
            if self.augmult:  # K views of each example, each weighing 1/K
                x = augment(x, k=k, flip=self.augment_flip, generator=self.generator).flatten(0, 1)
                labels = labels.repeat_interleave(k)  # [b K]
            logits = self.model(x).float()  # [b K, classes]
        loss = F.cross_entropy(logits, labels, reduction="sum")
        (loss * (scale / k)).backward()
        with torch.no_grad():
            self.loss_sum.add_(loss.detach() / k)
            self.correct.add_((logits.argmax(1) == labels).sum() / k)

    def _contrastive_chunk(self, idx: torch.Tensor, scale: float) -> None:
        """The contrastive loss of examples ``idx`` [b], their two views each the other's positive."""
        with self.numerics, torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            x = self.data.images[idx].float() / 255  # [b, C, H, W] on the 0..1 scale the views are drawn on
            v = contrastive.views(x, generator=self.generator, flip=self.augment_flip).flatten(0, 1)  # [2b, C, H, W]
            z = self.model(self.data.standardize(v)).float()  # [2b, PROJECTION_DIM]
        loss, correct = contrastive.nt_xent(z, temperature=self.temperature)  # summed over the b examples
        (loss * scale).backward()
        with torch.no_grad():
            self.loss_sum.add_(loss.detach())
            self.correct.add_(correct)

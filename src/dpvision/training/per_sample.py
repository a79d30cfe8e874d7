"""Per-sample gradients and the clipped sum, two ways.

Both backends compute, for a padded chunk of examples ``x`` [P, C, H, W] with
labels ``y`` [P] and weights ``w`` [P] (1 for a sampled example, 0 for padding),

    acc += sum_i w_i * min(1, C / (||g_i|| + 1e-6)) * g_i

where ``g_i`` is example i's gradient of its cross-entropy loss, flattened over
``model.parameters()`` in order (Opacus's flat clipping, same norm order: one
norm per parameter, then the norm of those). They also add the weighted loss
sum and number correct into two device scalars, so that an epoch needs no host
synchronisation to report them.

* ``VmapPerSample``: ``torch.func.vmap`` over ``torch.func.grad`` of a
  functional call. No hooks, no Python state between calls, so the whole chunk
  can be captured in one CUDA graph. Works for any model without batch-mixing
  layers or buffers written in forward.
* ``HooksPerSample``: Opacus's ``GradSampleModule`` (forward/backward hooks,
  per-layer einsum formulas). Eager only.

``benchmarks/NOTES.md`` has the measurements behind the per-device default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLIP_EPS = 1e-6  # Opacus's DPOptimizer: factor = min(1, C / (norm + 1e-6))


def clip_factors(per_param_norms: list[torch.Tensor], max_grad_norm: float, weights: torch.Tensor) -> torch.Tensor:
    """[P] per-sample factors w_i * min(1, C / (||g_i|| + 1e-6)) from per-parameter norms [P] each."""
    norms = torch.stack(per_param_norms, dim=1).norm(2, dim=1)  # [P]
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0) * weights


class VmapPerSample:
    name = "vmap"

    def __init__(self, model: nn.Module) -> None:
        from torch.func import functional_call, grad, vmap

        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        buffers = dict(model.named_buffers())

        def loss_one(params: dict, x: torch.Tensor, y: torch.Tensor):
            logits = functional_call(model, (params, buffers), (x.unsqueeze(0),))  # [1, classes]
            loss = F.cross_entropy(logits, y.unsqueeze(0))
            return loss, (loss.detach(), logits.detach().squeeze(0))

        self._per_sample = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0))

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, max_grad_norm: float,
                   acc_views: list[torch.Tensor], loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        params = {n: p.detach() for n, p in zip(self.names, self.params)}
        grads, (losses, logits) = self._per_sample(params, x, y)  # grads[n]: [P, *shape]
        flat = [grads[n].reshape(len(x), -1) for n in self.names]  # [P, numel]
        factors = clip_factors([g.norm(2, dim=1) for g in flat], max_grad_norm, w)  # [P]
        for view, g in zip(acc_views, flat):
            view.addmv_(g.t(), factors)  # view [numel] += g^T factors
        loss_sum.add_((losses * w).sum())
        correct.add_(((logits.argmax(1) == y).float() * w).sum())

    def close(self) -> None:
        pass


class HooksPerSample:
    name = "hooks"

    def __init__(self, model: nn.Module) -> None:
        from opacus.grad_sample import GradSampleModule

        self.model = model
        self.wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        self.params = [p for p in model.parameters()]

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, max_grad_norm: float,
                   acc_views: list[torch.Tensor], loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        logits = self.wrapped(x)  # [P, classes]
        losses = F.cross_entropy(logits, y, reduction="none")  # [P]
        losses.sum().backward()
        flat = [p.grad_sample.reshape(len(x), -1) for p in self.params]
        factors = clip_factors([g.norm(2, dim=1) for g in flat], max_grad_norm, w)
        with torch.no_grad():
            for view, g in zip(acc_views, flat):
                view.addmv_(g.t(), factors)
            loss_sum.add_((losses.detach() * w).sum())
            correct.add_(((logits.detach().argmax(1) == y).float() * w).sum())
        for p in self.params:
            p.grad_sample = None
            p.grad = None

    def close(self) -> None:
        self.wrapped._close()


BACKENDS = {"vmap": VmapPerSample, "hooks": HooksPerSample}

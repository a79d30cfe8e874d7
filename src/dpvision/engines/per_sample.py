"""Per-sample gradients and the clipped sum, three ways.

Every backend computes, for a padded chunk of examples ``x`` [P, C, H, W] with
labels ``y`` [P] and weights ``w`` [P] (1 for a sampled example, 0 for padding),

    acc += sum_i w_i * clip(||g_i||) * g_i

where ``g_i`` is example i's gradient of its cross-entropy loss, flattened over the
trainable parameters (``requires_grad``) of ``model.parameters()`` in order (the norm is
over all of them; frozen parameters get nothing), and ``clip``
maps the norms [P] to the run's clipping factors (:mod:`dpvision.engines.clipping`;
``flat`` is Opacus's min(1, C / (norm + 1e-6))). They also add the weighted loss
sum and number correct into two device scalars, so that an epoch needs no host
synchronisation to report them.

* ``VmapPerSample``: ``torch.func.vmap`` over ``torch.func.grad`` of a
  functional call. No hooks, no Python state between calls, so the whole chunk
  can be captured in one CUDA graph. Works for any model without batch-mixing
  layers or buffers written in forward; dropout draws a mask per example.
* ``HooksPerSample``: Opacus's ``GradSampleModule`` (forward/backward hooks,
  per-layer einsum formulas). Eager only.
* ``ManualPerSample`` (:mod:`dpvision.engines.manual`): Linear, Conv2d (weight-standardised ones too),
  GroupNorm and LayerNorm models, and torchvision's ViT (its class token and position embedding). One
  backward to the layer outputs, exact per-example norms per layer by the cheapest method (ghost
  norms or that layer's per-example gradients, :mod:`dpvision.engines.ghost`),
  then the clipped sum as one weighted batch gradient per layer (book-keeping):
  no per-example gradient of the whole model ever exists. Graph-capturable.

``benchmarks/NOTES.md`` has the measurements behind the per-device default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import nn
from torch.func import functional_call, grad, vmap

from dpvision.engines.clipping import ClipFn
from dpvision.engines.manual import ManualPerSample
from dpvision.engines.rounding import fp32_matmuls


def total_norms(per_param_norms: list[torch.Tensor]) -> torch.Tensor:
    """[B] per-example gradient norms over all parameters from per-parameter norms [B] each."""
    return torch.stack(per_param_norms, dim=1).norm(2, dim=1)


def clipped_sum_(flat: list[torch.Tensor], clip: ClipFn, w: torch.Tensor, acc_views: list[torch.Tensor]) -> None:
    """acc_views[k] += flat[k]^T (w clip(norms)) from per-example gradients flat[k] [B, numel_k]: the norms
    are those of exactly the tensors summed, and the sum runs in IEEE fp32 (no TF32, :mod:`.rounding`)."""
    with fp32_matmuls():
        factors = clip(total_norms([g.norm(2, dim=1) for g in flat])) * w  # [B]
        for view, g in zip(acc_views, flat):
            view.addmv_(g.t(), factors)  # view [numel] += g^T factors


class VmapPerSample:
    """Per-example gradients by ``torch.func`` (vmap over examples of the gradient of one example's loss)."""

    name = "vmap"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # Trainable parameters only: functional_call takes the frozen ones from the module itself.
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        loss = self.example_loss(model, dict(model.named_buffers()))
        # randomness="different": each example draws its own dropout / stochastic-depth mask.
        self._per_sample = vmap(grad(loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")

    @staticmethod
    def example_loss(model: nn.Module, buffers: dict):
        """One example's (loss, (loss, logits)) as a function of the parameters; x [C, H, W], y []."""
        def loss_one(params: dict, x: torch.Tensor, y: torch.Tensor):
            logits = functional_call(model, (params, buffers), (x.unsqueeze(0),))  # [1, classes]
            loss = F.cross_entropy(logits, y.unsqueeze(0))
            return loss, (loss.detach(), logits.detach().squeeze(0))
        return loss_one

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """What each example's loss is evaluated on (the augmult backend makes its K views here)."""
        return x

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, clip: ClipFn,
                   acc_views: list[torch.Tensor], loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        params = {n: p.detach() for n, p in zip(self.names, self.params)}
        grads, (losses, logits) = self._per_sample(params, self.inputs(x), y)  # grads[n]: [P, *shape]
        flat = [grads[n].reshape(len(x), -1) for n in self.names]  # [P, numel]
        clipped_sum_(flat, clip, w, acc_views)
        loss_sum.add_((losses * w).sum())
        correct.add_(((logits.argmax(1) == y).float() * w).sum())

    def close(self) -> None:
        pass


class HooksPerSample:
    name = "hooks"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
        self.params = [p for p in model.parameters() if p.requires_grad]  # Opacus skips the frozen ones

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, clip: ClipFn,
                   acc_views: list[torch.Tensor], loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        logits = self.wrapped(x)  # [P, classes]
        losses = F.cross_entropy(logits, y, reduction="none")  # [P]
        losses.sum().backward()
        flat = [p.grad_sample.reshape(len(x), -1) for p in self.params]
        with torch.no_grad():
            clipped_sum_(flat, clip, w, acc_views)
            loss_sum.add_((losses.detach() * w).sum())
            correct.add_(((logits.detach().argmax(1) == y).float() * w).sum())
        for p in self.params:
            p.grad_sample = None
            p.grad = None

    def close(self) -> None:
        self.wrapped._close()


BACKENDS = {"vmap": VmapPerSample, "hooks": HooksPerSample, "manual": ManualPerSample}

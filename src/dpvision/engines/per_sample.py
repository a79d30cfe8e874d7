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

* ``ManualPerSample``: hooks of our own that keep layer inputs/outputs, one
  batched backward to the outputs, and per-layer formulas (Linear, Conv2d,
  GroupNorm); no wasted parameter gradients; graph-capturable.

``benchmarks/NOTES.md`` has the measurements behind the per-device default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpvision.engines.base import UnsupportedModelError

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


class ManualPerSample:
    """Per-sample gradients from one batched backward to the layer outputs (no parameter gradients).

    Forward hooks keep each layer's input ``a`` and output ``z``; ``autograd.grad``
    of the summed loss w.r.t. the outputs gives ``dz`` (autograd skips the weight
    gradients nobody asked for). Then per layer: Linear, by ghost norms
    ``||dz_i|| ||a_i||`` and one matrix product for the clipped sum (nothing
    per-sample is materialised); Conv2d, ``dz_i @ unfold(a_i)^T`` as one batched
    product; GroupNorm, ``sum(dz * a_hat)`` and ``sum(dz)``. Graph-capturable.
    """

    name = "manual"
    SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        modules = dict(model.named_modules())
        self.entries = []  # (module, "weight"|"bias") in model.parameters() order
        for name, _ in model.named_parameters():
            owner, _, attr = name.rpartition(".")
            module = modules[owner]
            if type(module) not in self.SUPPORTED or attr not in ("weight", "bias"):
                raise UnsupportedModelError(f"manual per-sample gradients: unsupported layer {type(module).__name__}")
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                                  or isinstance(module.padding, str)):
                raise UnsupportedModelError("manual per-sample gradients: grouped/padded-mode Conv2d")
            if isinstance(module, nn.GroupNorm) and not module.affine:
                raise UnsupportedModelError("manual per-sample gradients: GroupNorm without affine")
            self.entries.append((module, attr))
        self.layers = list(dict.fromkeys(m for m, _ in self.entries))
        self._store: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._active = False
        # None: fp32. torch.bfloat16: autocast forward/backward and bf16 per-sample conv einsums
        # (fp32 accumulation inside the matmul); norms, clipping and the clipped sum stay fp32.
        self.amp_dtype: torch.dtype | None = None
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module, inputs, output):
        if self._active:
            if module in self._store:  # weight sharing: the per-layer formulas would miss a use
                        raise UnsupportedModelError(f"manual per-sample gradients: {type(module).__name__} used twice")
            self._store[module] = (inputs[0].detach(), output)

    def _layer_grads(self, module, a: torch.Tensor, dz: torch.Tensor) -> dict:
        """{"weight"/"bias": per-sample gradient [B, numel] or ("ghost", dz, a) for a 2-D Linear}."""
        b = len(a)
        if isinstance(module, nn.Conv2d) and self.amp_dtype is not None:
            a, dz = a.to(self.amp_dtype), dz.to(self.amp_dtype)
        else:  # small layers: fp32 formulas
            a, dz = a.float(), dz.float()
        if isinstance(module, nn.Linear):
            if a.dim() == 2:
                return {"weight": ("ghost", dz, a), "bias": dz}
            a3, dz3 = a.reshape(b, -1, a.shape[-1]), dz.reshape(b, -1, dz.shape[-1])  # [B, T, in], [B, T, out]
            return {"weight": torch.bmm(dz3.transpose(1, 2), a3).reshape(b, -1), "bias": dz3.sum(1)}
        if isinstance(module, nn.Conv2d):
            dz3 = dz.reshape(b, dz.shape[1], -1)  # [B, C_out, T]
            if tuple(module.dilation) == (1, 1):
                # Patches as a strided view (F.unfold on CUDA launches one im2col kernel per example).
                (ph, pw), (sh, sw), (kh, kw) = module.padding, module.stride, module.kernel_size
                patches = F.pad(a, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # [B, C, Ho, Wo, kh, kw]
                weight = torch.einsum("bohw,bchwij->bocij", dz, patches)  # [B, C_out, C_in, kh, kw]
                return {"weight": weight.reshape(b, -1).float(), "bias": dz3.float().sum(2)}
            cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                            stride=module.stride)  # [B, C_in*k*k, T]
            return {"weight": torch.bmm(dz3, cols.transpose(1, 2)).reshape(b, -1).float(),
                    "bias": dz3.float().sum(2)}
        # GroupNorm: a_hat = normalised input, per-sample gamma/beta gradients summed over space.
        a_hat = F.group_norm(a, module.num_groups, eps=module.eps)
        spatial = tuple(range(2, a.dim()))
        return {"weight": (dz * a_hat).sum(spatial), "bias": dz.sum(spatial)}

    def accumulate(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, max_grad_norm: float,
                   acc_views: list[torch.Tensor], loss_sum: torch.Tensor, correct: torch.Tensor) -> None:
        self._store.clear()
        self._active = True
        try:
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16,
                                                     enabled=self.amp_dtype is not None):
                logits = self.model(x).float()  # [B, classes]
        finally:
            self._active = False
        losses = F.cross_entropy(logits, y, reduction="none")  # [B]
        outputs = [self._store[m][1] for m in self.layers]
        dzs = torch.autograd.grad(losses.sum(), outputs)
        with torch.no_grad():
            grads = {}
            for m, dz in zip(self.layers, dzs):
                for attr, g in self._layer_grads(m, self._store[m][0], dz).items():
                    grads[(m, attr)] = g
            per_entry = [grads[e] for e in self.entries]
            norms = [g[1].norm(2, dim=1) * g[2].norm(2, dim=1) if isinstance(g, tuple) else g.norm(2, dim=1)
                     for g in per_entry]
            factors = clip_factors(norms, max_grad_norm, w)
            for view, g in zip(acc_views, per_entry):
                if isinstance(g, tuple):  # ghost Linear weight: sum_i f_i dz_i a_i^T = (f*dz)^T a
                    _, dz, a = g
                    view.view(dz.shape[1], a.shape[1]).addmm_((dz * factors[:, None]).t(), a)
                else:
                    view.addmv_(g.t(), factors)
            loss_sum.add_((losses.detach() * w).sum())
            correct.add_(((logits.detach().argmax(1) == y).float() * w).sum())
        self._store.clear()

    def close(self) -> None:
        for h in self._handles:
            h.remove()


BACKENDS = {"vmap": VmapPerSample, "hooks": HooksPerSample, "manual": ManualPerSample}

"""GroupNorm -> ReLU -> MaxPool2d(2), and ReLU -> GroupNorm, as one kernel forward and one backward (CUDA, Triton).

CelebaCNN's blocks are conv -> GroupNorm -> ReLU -> 2x2 max-pool. Eager PyTorch runs the last three
as six kernels, each a pass over the conv output (GroupNorm's statistics and normalisation, ReLU,
the pool with int64 indices, then their backwards); they were 2 of the 3.5 ms of a CelebA-64 step on
an H200 (``benchmarks/NOTES.md``, run 14), the same in DP and non-DP training. Here one program per
(example, group) does the lot:

* forward: the group's mean and variance (Chan's combination of block statistics,
  ``triton_kernels.chan_update``, shared with :mod:`dpvision.engines.group_norm`'s row sums), then y = (x - mu) rstd gamma + beta on every 2x2 window and
  its ReLU'd maximum. Only the pooled output [B, C, H/2, W/2] and the statistics [B G, 2] are written;
  y, its ReLU and the pool's indices are never stored (the backward recomputes them from x);
* backward: pass A recomputes each window's first maximum (PyTorch's rule: the earliest of equal
  values; ReLU zeroes the gradient of a window whose maximum is <= 0, so ties at 0 do not matter)
  and sums per channel dgamma_i = sum dy x_hat and dbeta_i = sum dy, which are example i's GroupNorm
  gradients; pass B writes dx = rstd (gamma dy - mean(gamma dy) - x_hat mean(gamma dy x_hat)).

The per-example (gamma, beta) gradients [B, C] come out of the backward for free: under DP the
manual per-sample backend takes them through ``per_example`` (:func:`fuse_blocks`) instead of its
own GroupNorm pass. Statistics and sums are float32; x, the output and dx keep x's dtype (bfloat16
under ``precision="bf16"``: the next conv reads it in bfloat16 anyway).

WideResNet's pre-activation blocks run ReLU -> GroupNorm before each conv (no pool), through the model's
``act_norm(x, act, *norms)`` seam (:mod:`dpvision.models.wide_resnet`): :func:`relu_group_norms` does it in one
program per (example, group) each way, saving x only (eager saves and rereads relu(x) and runs four
kernels: ReLU, GroupNorm, their backwards, plus DP's per-example sums). x may be NCHW or channels-last
(the kernels take a channel's and a position's strides; out and dx keep x's layout). Its backward hands the
same per-example (gamma, beta) gradients to ``per_example`` (no conv: a block's input is a sum).

Where the kernels cannot run (CPU, no Triton, odd sizes) the block runs its modules as before, so
the CPU engine stays bit for bit what it was. ``TRITON_INTERPRET=1`` runs the kernels on the CPU
(the tests do, against PyTorch's autograd).
"""

from __future__ import annotations

import functools
import os
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dpvision.models.wide_resnet import act_norm

TILE = 1024  # pooled outputs per loop iteration of a program (channels x positions)
STATS_BLOCK = 2048  # elements per loop iteration of the forward's statistics pass
NUM_WARPS = 8

# (GroupNorm, its dgamma [B, C], dbeta [B, C], the Conv2d whose output it normalises or None, that conv's
# per-example bias gradients [B, C] = dx summed over space)
PerExample = Callable[[nn.GroupNorm, torch.Tensor, torch.Tensor, "nn.Conv2d | None", torch.Tensor], None]


@functools.cache
def _kernels():
    """(forward, backward) Triton kernels, compiled on first use; None without Triton."""
    try:
        from dpvision.engines.triton_kernels import backward_kernel, forward_kernel
    except ImportError:
        return None
    return forward_kernel, backward_kernel


@functools.cache
def _norm_kernels():
    """(forward, backward) ReLU -> GroupNorm Triton kernels; None without Triton."""
    try:
        from dpvision.engines.triton_kernels import relu_norm_backward_kernel, relu_norm_forward_kernel
    except ImportError:
        return None
    return relu_norm_forward_kernel, relu_norm_backward_kernel


def _blocks(cg: int, hwo: int) -> tuple[int, int]:
    """(CG_P2, BLOCK_HW): the group's channels rounded up to a power of 2, pooled positions per iteration."""
    cg_p2 = 1 << (cg - 1).bit_length()
    hw_p2 = 1 << (hwo - 1).bit_length()
    return cg_p2, max(1, min(hw_p2, TILE // cg_p2))


def _example_sums(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Buffers [B, C] float32 for a fused backward: per-example dgamma, dbeta, and dx summed over space."""
    return tuple(torch.empty(x.shape[:2], device=x.device, dtype=torch.float32) for _ in range(3))


def _parameter_grads(ctx, gw: torch.Tensor, gb: torch.Tensor, conv: nn.Conv2d | None, cb: torch.Tensor):
    """A fused backward's (dgamma, dbeta) from the per-example ones [B, C], after handing those (and the sums
    of dx over space ``cb``) to the backend's ``per_example``."""
    if ctx.per_example is not None:
        ctx.per_example(ctx.module, gw, gb, conv, cb)
    weight, bias = ctx.module.weight, ctx.module.bias
    return (gw.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None,
            gb.sum(0).to(bias.dtype) if ctx.needs_input_grad[2] else None)


def _kernel_input(x: torch.Tensor, module: nn.Module, kernels, channels_last: bool = False) -> bool:
    """Whether Triton ``kernels`` (not None) can take ``x`` [B, C, H, W] (contiguous, or channels-last where
    allowed; CUDA, or the CPU under the interpreter) normalised by the affine GroupNorm ``module``."""
    return (type(module) is nn.GroupNorm and module.affine and x.dim() == 4 and (x.is_contiguous() or channels_last)
            and len(x) > 0
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (x.is_cuda or x.device.type == "cpu" and _interpreting())
            and module.weight.device == x.device and kernels is not None)


class _GroupNormReluPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module, per_example, conv):
        b, c, h, w = x.shape
        groups = module.num_groups
        out = torch.empty(b, c, h // 2, w // 2, device=x.device, dtype=x.dtype)
        stats = torch.empty(b * groups, 2, device=x.device, dtype=torch.float32)  # (mean, rstd) per group
        cg_p2, block_hw = _blocks(c // groups, out[0, 0].numel())
        _kernels()[0][(b * groups,)](x, weight, bias, out, stats, c, h * w, w, w // 2, out[0, 0].numel(), c // groups,
                                     module.eps, CG_P2=cg_p2, BLOCK_HW=block_hw, BLOCK_S=STATS_BLOCK,
                                     num_warps=NUM_WARPS)
        ctx.save_for_backward(x, weight, bias, stats)
        ctx.module, ctx.per_example, ctx.conv = module, per_example, conv
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, stats = ctx.saved_tensors
        b, c, h, w = x.shape
        groups = ctx.module.num_groups
        dout, dx, (gw, gb, cb) = dout.contiguous(), torch.empty_like(x), _example_sums(x)
        cg_p2, block_hw = _blocks(c // groups, dout[0, 0].numel())
        _kernels()[1][(b * groups,)](x, weight, bias, stats, dout, dx, gw, gb, cb, c, h * w, w, w // 2,
                                     dout[0, 0].numel(), c // groups, CG_P2=cg_p2, BLOCK_HW=block_hw,
                                     num_warps=NUM_WARPS)
        return dx, *_parameter_grads(ctx, gw, gb, ctx.conv, cb), None, None, None


def fusable(x: torch.Tensor, module: nn.GroupNorm) -> bool:
    """Whether the kernels can run GroupNorm -> ReLU -> 2x2 max-pool on ``x`` [B, C, H, W]."""
    return _kernel_input(x, module, _kernels()) and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _apply(x: torch.Tensor, module: nn.GroupNorm, per_example: PerExample | None, conv: nn.Conv2d | None):
    return _GroupNormReluPool.apply(x, module.weight, module.bias, module, per_example, conv)


def group_norm_relu_pool(x: torch.Tensor, module: nn.GroupNorm, per_example: PerExample | None = None,
                         conv: nn.Conv2d | None = None) -> torch.Tensor:
    """``max_pool2d(relu(module(x)), 2)``, in one kernel each way where :func:`fusable`, else by the modules.

    ``per_example(module, dgamma, dbeta, conv, dx_sums)`` is called from the backward with example i's
    GroupNorm gradients [B, C] and the sums over space of dx [B, C] (float32): the per-example bias
    gradients of ``conv``, when x is that conv's output. The modules' path never calls it.
    """
    if fusable(x, module):
        return _apply(x, module, per_example, conv)
    return F.max_pool2d(F.relu(module(x)), 2)


def _layout(x: torch.Tensor) -> tuple[torch.memory_format, tuple[int, int, int]]:
    """(x's memory format, (stride of an example, of a channel, of a position)): NCHW or channels-last."""
    fmt = torch.contiguous_format if x.is_contiguous() else torch.channels_last
    return fmt, (x.stride(0), x.stride(1), x.stride(3))


class _ReluGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module, per_example):
        b, c, h, w = x.shape
        groups = module.num_groups
        fmt, strides = _layout(x)
        out = torch.empty_like(x, memory_format=fmt)
        stats = torch.empty(b * groups, 2, device=x.device, dtype=torch.float32)  # (mean, rstd) of relu(x)
        cg_p2, block_hw = _blocks(c // groups, h * w)
        _norm_kernels()[0][(b * groups,)](x, weight, bias, out, stats, c, h * w, c // groups, module.eps, *strides,
                                          CG_P2=cg_p2, BLOCK_HW=block_hw, num_warps=NUM_WARPS)
        ctx.save_for_backward(x, weight, bias, stats)  # x, not relu(x): the backward recomputes it
        ctx.module, ctx.per_example, ctx.fmt = module, per_example, fmt
        return out

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, stats = ctx.saved_tensors
        b, c, h, w = x.shape
        groups = ctx.module.num_groups
        dy, dx, (gw, gb, cb) = dy.contiguous(memory_format=ctx.fmt), torch.empty_like(x), _example_sums(x)
        cg_p2, block_hw = _blocks(c // groups, h * w)
        _norm_kernels()[1][(b * groups,)](x, weight, bias, stats, dy, dx, gw, gb, cb, c, h * w, c // groups,
                                          *_layout(x)[1], CG_P2=cg_p2, BLOCK_HW=block_hw, num_warps=NUM_WARPS)
        return dx, *_parameter_grads(ctx, gw, gb, None, cb), None, None


def norm_fusable(x: torch.Tensor, act: nn.Module, norm: nn.Module) -> bool:
    """Whether the kernels can run ``norm(act(x))`` on ``x`` [B, C, H, W]: a ReLU, then an affine GroupNorm; x
    NCHW-contiguous or channels-last."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return type(act) is nn.ReLU and _kernel_input(x, norm, _norm_kernels(), channels_last)


def relu_group_norms(x: torch.Tensor, act: nn.Module, *norms: nn.Module,
                     per_example: PerExample | None = None) -> tuple[torch.Tensor, ...]:
    """``norm(act(x))`` for each of ``norms`` (WideResNet's ``act_norm`` seam): one kernel each way per norm where
    :func:`norm_fusable`, else by the modules, act once. ``per_example(norm, dgamma, dbeta, None, dx_sums)``:
    as for :func:`group_norm_relu_pool`."""
    if all(norm_fusable(x, act, n) for n in norms):
        return tuple(_ReluGroupNorm.apply(x, n.weight, n.bias, n, per_example) for n in norms)
    return act_norm(x, act, *norms)  # the model's own seam: the modules, act once


def _has_seam(module: nn.Module) -> bool:
    return "act_norm" in vars(type(module))


def fuse_act_norms(model: nn.Module, per_example: PerExample | None = None) -> int:
    """Give every module with an ``act_norm`` seam (WideResNet and its blocks) the kernels' ReLU -> GroupNorm.
    Returns the number of affine GroupNorms such modules hold (each fused where :func:`norm_fusable`)."""
    count = 0
    for m in model.modules():
        if _has_seam(m):
            m.act_norm = functools.partial(relu_group_norms, per_example=per_example)
            count += sum(type(c) is nn.GroupNorm and c.affine for c in m.children())
    return count


def _is_pool2(m: nn.Module) -> bool:
    return (type(m) is nn.MaxPool2d and m.kernel_size in (2, (2, 2)) and m.stride in (2, (2, 2), None)
            and m.padding in (0, (0, 0)) and m.dilation in (1, (1, 1)) and not m.ceil_mode and not m.return_indices)


def fusable_runs(seq: nn.Sequential) -> list[int]:
    """Indices j where ``seq[j:j+3]`` is GroupNorm (affine), ReLU, MaxPool2d(2)."""
    mods = list(seq)
    return [j for j in range(len(mods) - 2)
            if type(mods[j]) is nn.GroupNorm and mods[j].affine and type(mods[j + 1]) is nn.ReLU
            and _is_pool2(mods[j + 2])]


def _fused_forward(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    mods, j = list(self), 0
    starts = self._dpvision_fused  # indices of GroupNorm -> ReLU -> pool runs
    while j < len(mods):
        if j in starts and fusable(x, mods[j]):
            conv = mods[j - 1] if j > 0 and type(mods[j - 1]) is nn.Conv2d else None  # x is its output
            x = _apply(x, mods[j], self._dpvision_per_example, conv)
            j += 3
        else:
            x = mods[j](x)
            j += 1
    return x


def fuse_blocks(model: nn.Module, per_example: PerExample | None = None) -> int:
    """Run every GroupNorm -> ReLU -> MaxPool2d(2) inside an ``nn.Sequential`` of ``model`` fused.

    The modules and parameters stay as they are (same ``state_dict``); each such Sequential gets an
    instance ``forward`` that runs the kernels where :func:`fusable` and the modules themselves (their
    hooks included) elsewhere; and every ReLU -> GroupNorm of a module with an ``act_norm`` seam
    (:func:`fuse_act_norms`). Returns the number of runs fused; :func:`unfuse_blocks` undoes it.
    """
    count = fuse_act_norms(model, per_example)
    for seq in model.modules():
        if type(seq) is nn.Sequential and (starts := fusable_runs(seq)):
            seq._dpvision_fused = frozenset(starts)
            seq._dpvision_per_example = per_example
            seq.forward = types.MethodType(_fused_forward, seq)
            count += len(starts)
    return count


def unfuse_blocks(model: nn.Module) -> None:
    for seq in model.modules():
        seq.__dict__.pop("act_norm", None)
        if "_dpvision_fused" in seq.__dict__:
            for name in ("forward", "_dpvision_fused", "_dpvision_per_example"):
                seq.__dict__.pop(name, None)

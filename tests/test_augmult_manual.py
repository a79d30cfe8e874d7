"""Augmentation multiplicity on the manual backend (``AugmultManual``): the same clipped sum as torch.func's vmap
path and as per-example autograd in float64, one clipping factor per example (never per view), and the engine's
choice between the two paths.

Every comparison draws the crops and flips from the same generator state, so all three see the same K views.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer

from dpvision.data.tensors import ImageTensors
from dpvision.engines import OptimizerSpec
from dpvision.engines.augmult import AugmultManual, AugmultPerSample, augment
from dpvision.engines.clipping import CLIPPING_RULES
from dpvision.engines.ghost import GHOST, GROUPED, MATERIALISE
from dpvision.engines.per_sample import ManualPerSample
from dpvision.models.external import make_dp_compatible
from dpvision.models.wide_resnet import WideResNet
from tests.engine_helpers import DP, fast_engine

SEED = 11  # the augment generator's seed, shared by every path compared


def tiny_wrn(weight_standardization: bool = False) -> nn.Module:
    """WRN-16-4's architecture, narrow (widen 1, depth 10): stem, projected and plain blocks, GroupNorm, head;
    optionally with weight-standardised convs (``model.weight_standardization``, De et al.'s choice)."""
    return WideResNet(in_channels=3, num_classes=4, depth=10, widen=1, weight_standardization=weight_standardization)


def group_norm_cnn() -> nn.Module:
    """GroupNorm on the input (its dz is asked for) and after convs (taken by a hook), a stride-2 conv."""
    return nn.Sequential(nn.GroupNorm(1, 3), nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.GroupNorm(4, 4, eps=1e-3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 4))


def tiny_vit() -> nn.Module:
    """torchvision's ViT, tiny (LayerNorm, attention's Linears on [B, T, D], class token, position embedding)."""
    return make_dp_compatible(VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8,
                                                mlp_dim=8, num_classes=4))


MODELS = {"wrn": tiny_wrn, "wrn_ws": lambda: tiny_wrn(weight_standardization=True), "group_norm_cnn": group_norm_cnn,
          "vit": tiny_vit}


def batch(n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def clipped_sum(backend, model: nn.Module, x, y, c: float, weights=None) -> torch.Tensor:
    """The backend's clipped sum [P] (float64 copy) of chunk (x, y) with the flat rule at C."""
    dev = x.device
    acc = torch.zeros(sum(p.numel() for p in model.parameters()), device=dev)
    views, offset = [], 0
    for p in model.parameters():
        views.append(acc[offset:offset + p.numel()])
        offset += p.numel()
    w = torch.ones(len(x), device=dev) if weights is None else weights.to(dev)
    clip = functools.partial(CLIPPING_RULES["flat"].factors, max_grad_norm=c)
    backend.accumulate(x, y, w, clip, views, torch.zeros((), device=dev), torch.zeros((), device=dev))
    return acc.double().cpu()


def reference(model: nn.Module, x, y, k: int, c: float, per_view: bool = False) -> torch.Tensor:
    """sum_i clip(g_i) by per-example autograd in float64, g_i the gradient of example i's mean loss over its
    K views (``per_view``: the WRONG rule, each view's gradient clipped, then averaged)."""
    model = copy.deepcopy(model).double()
    views = augment(x.double(), k=k, flip=True, generator=torch.Generator().manual_seed(SEED))  # [P, K, C, H, W]
    total = 0
    for i in range(len(x)):
        groups = [views[i, j:j + 1] for j in range(k)] if per_view else [views[i]]
        for group in groups:  # [K or 1, C, H, W]
            loss = F.cross_entropy(model(group), y[i].expand(len(group)))
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
            total = total + g * min(1.0, c / (g.norm().item() + 1e-6)) / len(groups)
    return total


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", ["auto", GHOST, MATERIALISE, GROUPED])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("arch", list(MODELS))
def test_manual_views_equal_vmap_and_float64_autograd(arch, k, method):
    torch.manual_seed(2)
    model, (x, y) = MODELS[arch](), batch()
    c = 0.05  # most examples clipped
    manual = AugmultManual(model, k=k, flip=True, generator=torch.Generator().manual_seed(SEED))
    manual.method = method
    if method != "auto":  # pass 2 by book-keeping (a weight-gradient call over the views); "auto": kept gradients
        manual.keep_budget = 0
    ours = clipped_sum(manual, model, x, y, c)
    manual.close()
    vmapped = clipped_sum(AugmultPerSample(model, k=k, flip=True, generator=torch.Generator().manual_seed(SEED)),
                          model, x, y, c)
    exact = reference(model, x, y, k, c)
    assert rel(ours, exact) < 2e-5
    assert rel(vmapped, exact) < 2e-5


def test_one_view_equals_the_plain_manual_backend_bit_for_bit():
    """K = 1: the manual backend on the one augmented view of each example, same bits."""
    torch.manual_seed(3)
    model, (x, y) = tiny_wrn(), batch()
    ours = clipped_sum(AugmultManual(model, k=1, flip=True, generator=torch.Generator().manual_seed(SEED)),
                       model, x, y, 0.05)
    views = augment(x, k=1, flip=True, generator=torch.Generator().manual_seed(SEED)).squeeze(1)
    plain = clipped_sum(ManualPerSample(model), model, views.contiguous(), y, 0.05)
    assert torch.equal(ours, plain)
    identity = clipped_sum(AugmultManual(model, k=1, flip=False, pad=0, generator=torch.Generator()),
                           model, x, y, 0.05)
    assert torch.equal(identity, clipped_sum(ManualPerSample(model), model, x, y, 0.05))


def test_one_factor_per_example_of_the_mean_over_views():
    """Clipping each view's gradient (then averaging) is another sum: ours is the per-example one."""
    torch.manual_seed(4)
    model, (x, y) = group_norm_cnn(), batch(n=3)
    c = 0.02
    ours = clipped_sum(AugmultManual(model, k=4, flip=True, generator=torch.Generator().manual_seed(SEED)),
                       model, x, y, c)
    per_example, per_view = reference(model, x, y, 4, c), reference(model, x, y, 4, c, per_view=True)
    assert rel(per_view, per_example) > 1e-2  # the two rules differ clearly here
    assert rel(ours, per_example) < 2e-5
    # Nothing clipped: the plain sum of the examples' MEAN gradients over their views (not K times it).
    unclipped = clipped_sum(AugmultManual(model, k=4, flip=True, generator=torch.Generator().manual_seed(SEED)),
                            model, x, y, 1e6)
    assert rel(unclipped, reference(model, x, y, 4, 1e6)) < 2e-5


@pytest.mark.parametrize("backend_class", [AugmultManual, AugmultPerSample], ids=["manual", "vmap"])
def test_each_example_contributes_at_most_c(backend_class):
    torch.manual_seed(5)
    model = tiny_wrn()
    x, y = 30 * torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
    backend = backend_class(model, k=4, flip=True, generator=torch.Generator().manual_seed(0))
    for i in range(4):  # one example at a time (weight 1, the others 0): sensitivity C, whatever K
        weights = torch.zeros(4)
        weights[i] = 1.0
        assert clipped_sum(backend, model, x, y, 0.3, weights).norm() <= 0.3 * (1 + 1e-5)


def small_images(n: int = 24) -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageTensors(images, torch.randint(0, 4, (n,), generator=g), (0.5,) * 3, (0.25,) * 3)


class WithLayerNorm(nn.Module):
    """A LayerNorm on each image's 8 rows [B, 8, 24] (tokens: its per-example gradients sum over them)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(24), nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(self.norm(x.permute(0, 2, 1, 3).flatten(2)).flatten(1))


def depthwise_cnn() -> nn.Module:
    """A grouped conv: not a manual-backend layer, so augmult runs on torch.func's vmap."""
    return nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.Flatten(), nn.Linear(3 * 8 * 8, 4))


def engine(model, **options):
    return fast_engine(model=model, train_data=small_images(), batch_size=8, optimizer=OptimizerSpec(lr=0.5),
                       dp=DP(noise_multiplier=0.0, max_grad_norm=0.1), seed=3, augmult=3, augment_flip=True, **options)


def test_engine_picks_the_manual_path_else_vmap_with_a_notice(capsys):
    torch.manual_seed(6)
    model = group_norm_cnn()
    manual, vmapped = engine(copy.deepcopy(model)), engine(copy.deepcopy(model), grad_sample_mode="vmap")
    assert (manual.grad_sample_mode, type(manual.backend)) == ("manual", AugmultManual)
    assert (vmapped.grad_sample_mode, type(vmapped.backend)) == ("vmap", AugmultPerSample)
    assert "notice" not in capsys.readouterr().err
    for e in (manual, vmapped):  # same sampling, same views, no noise: the same steps
        e.train_epoch(max_steps=2)
    assert rel(torch.cat([p.detach().reshape(-1) for p in manual.model.parameters()]),
               torch.cat([p.detach().reshape(-1) for p in vmapped.model.parameters()])) < 1e-5
    fallback = engine(depthwise_cnn())
    assert fallback.grad_sample_mode == "vmap"
    assert "notice: augmult: the manual per-sample backend does not support this model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="augmult needs grad_sample_mode 'manual' or 'vmap'"):
        engine(group_norm_cnn(), grad_sample_mode="hooks")


def test_manual_path_resumes_bit_for_bit():
    torch.manual_seed(7)
    model = group_norm_cnn()
    a = engine(copy.deepcopy(model))
    a.train_epoch(max_steps=1)
    state = copy.deepcopy(a.state_dict())  # the augment generator included
    a.train_epoch(max_steps=2)
    resumed = engine(group_norm_cnn())
    resumed.load_state_dict(state)
    resumed.train_epoch(max_steps=2)
    for p, q in zip(a.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_manual_views_match_vmap_and_stay_within_c(amp):
    """On the GPU (the registry's WRN layers: weight-standardised convs): the manual path against the vmap path
    on the same views (fp32: cuDNN's TF32 off; bf16 forward: within bf16's rounding), and under bf16 with the
    rounding margin every example's share of the sum as computed still has norm <= C."""
    torch.manual_seed(2)
    model = tiny_wrn(weight_standardization=True).cuda()
    x, y = batch(n=6)
    x, y = 20 * x.cuda(), y.cuda()

    def manual():
        backend = AugmultManual(model, k=3, flip=True, generator=torch.Generator("cuda").manual_seed(SEED))
        backend.amp_dtype, backend.reduced_precision = amp, amp is not None
        return backend

    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        ours = clipped_sum(manual(), model, x, y, 0.05)
        vmapped = clipped_sum(AugmultPerSample(model, k=3, flip=True,
                                               generator=torch.Generator("cuda").manual_seed(SEED)), model, x, y, 0.05)
    # bf16 against fp32 (the vmap path has no bf16): the forward itself rounds to 8 bits; 12.2% measured here on an
    # H200, 16-17% for a whole WRN-16-4 step (benchmarks/profile_dp_step.py --sections numerics, session 8).
    assert rel(ours, vmapped) < (2e-1 if amp else 1e-4)
    backend = manual()
    for i in range(len(x)):
        weights = torch.zeros(len(x))
        weights[i] = 1.0
        backend.generator.manual_seed(SEED)
        assert clipped_sum(backend, model, x, y, 0.3, weights).norm() <= 0.3 * (1 + 1e-6)

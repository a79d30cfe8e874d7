"""torchvision models by name and users' factories (``dpvision.models.external``), and the fast engine on them.

The equality tests compare the fast engine's first DP step (noise off, small C so that most examples are
clipped) with real Opacus on exactly the examples the engine sampled. Which Opacus: its hooks
(``GradSampleModule``) where they are right; Opacus 1.6's full backward hooks refuse torchvision's in-place
residual additions (``out += identity`` on a hooked GroupNorm output: ResNet, MobileNet, EfficientNet), so
those use Opacus's ExpandedWeights mode; and Opacus's Conv2d formula is wrong on channels-last inputs (the
downsampling convs after ConvNeXt's LayerNorm2d permute), so ConvNeXt uses Opacus with every layer by
functorch (``force_functorch``). Dropout and stochastic depth are set to 0 in these copies: two
implementations never draw the same masks.
"""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch
from torch import nn

from dpvision.engines import OptimizerSpec
from tests.engine_helpers import DP, fast_engine, plan_for
from dpvision.engines.fast import FastEngine
from dpvision.models.external import is_external, make_dp_compatible, resolve_model
from dpvision.privacy.accounting import expected_batch_size
from dpvision.seeding import make_generator
from tests.test_fast_engine import make_data

SIZES = dict(in_channels=3, num_classes=3, image_size=32)


def test_registry_names_are_not_external():
    assert resolve_model("wrn16_4", **SIZES) is None and not is_external("sample_convnet")


@pytest.mark.parametrize(("name", "message"), [
    ("torchvision:resnet81", "model.name torchvision:resnet81 is not a torchvision classification model; did you "
                             "mean torchvision:resnet18, torchvision:resnet152"),
    ("torchvision:fasterrcnn_resnet50_fpn", "model.name torchvision:fasterrcnn_resnet50_fpn is not a classification "
                                            "model"),
    ("torchvision:vit_b_16", "model.name torchvision:vit_b_16 needs an image size that is a multiple of its patch "
                             "size 16, got 28"),
    ("no_such_package.models:make_net", "model.name no_such_package.models:make_net: cannot import module "
                                        "'no_such_package.models'"),
    ("os.path:no_such_function", "model.name os.path:no_such_function: module 'os.path' has no attribute"),
    ("os.path:sep", "model.name os.path:sep: str is not callable"),
    ("os.path:join", "model.name os.path:join: the factory raised TypeError"),
    ("collections:OrderedDict", "model.name collections:OrderedDict: the factory returned a OrderedDict, not a "
                                "torch.nn.Module"),
])
def test_bad_names_fail_in_one_line(name, message):
    with pytest.raises(ValueError) as err:
        resolve_model(name, in_channels=3, num_classes=10, image_size=28)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_torchvision_model_is_made_dp_compatible_for_the_data():
    model = resolve_model("torchvision:resnet18", in_channels=1, num_classes=7, image_size=28)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7  # stem and head fit the data
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model.bn1, nn.GroupNorm) and model.bn1.num_groups == 32
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_vit_gets_the_image_size_and_dp_attention():
    from opacus.layers import DPMultiheadAttention

    model = resolve_model("torchvision:vit_b_16", **SIZES)
    assert model.image_size == 32 and model.heads.head.out_features == 3
    assert not any(type(m) is nn.MultiheadAttention for m in model.modules())
    assert sum(isinstance(m, DPMultiheadAttention) for m in model.modules()) == 12


def test_factory_gets_only_the_keywords_it_accepts(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent("""
        from torch import nn
        calls = []
        def make_net(num_classes, image_size=8):
            calls.append((num_classes, image_size))
            return nn.Sequential(nn.Flatten(), nn.BatchNorm1d(3 * image_size ** 2), nn.Linear(3 * image_size ** 2,
                                 num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    model = resolve_model("my_nets:make_net", in_channels=3, num_classes=4, image_size=6)
    assert sys.modules["my_nets"].calls == [(4, 6)]
    assert isinstance(model[1], nn.GroupNorm)  # Opacus's fix: BatchNorm -> GroupNorm


class OwnBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass: Opacus's fixers and validators match exact types and miss it."""


def test_what_cannot_be_made_compatible_fails_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), OwnBatchNorm(4))
    with pytest.raises(ValueError, match="^mine cannot be made DP-compatible: OwnBatchNorm mixes the examples of "
                                         "a batch$"):
        make_dp_compatible(model, "mine")


# ----------------------------------------------------------------- the fast engine against Opacus
class UserNet(nn.Module):
    """A user's own module with the layer types of the issue: a depthwise conv with reflect padding,
    GroupNorm, a Linear on 3-d inputs [B, T, d], LayerNorm, and a parameter of its own (a token)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")
        self.norm = nn.GroupNorm(4, 8)
        self.token = nn.Parameter(torch.randn(1, 1, 8) * 0.1)
        self.mix = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.norm(self.depthwise(self.stem(x))))
        tokens = nn.functional.avg_pool2d(x, 8).flatten(2).transpose(1, 2)  # [B, 16, 8]
        tokens = torch.cat([self.token.expand(len(x), -1, -1), tokens], dim=1)  # [B, 17, 8]
        return self.head(self.ln(torch.relu(self.mix(tokens)))[:, 0])


def _no_randomness(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(getattr(module, "p", None), float):  # nn.Dropout, torchvision's StochasticDepth
            module.p = 0.0
    return model


def opacus_step(model, data, idx, *, mode: str, spec, dp, sample_rate):
    """One DPOptimizer step of real Opacus on examples ``idx`` (loss "mean", as make_private)."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleExpandedWeights
    from opacus.optimizers import DPOptimizer

    wrapped = (GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean") if mode == "ew"
               else GradSampleModule(model, batch_first=True, loss_reduction="mean",
                                     force_functorch=mode == "functorch"))
    plan = plan_for(data, round(len(data) * sample_rate), dp)
    assert plan.sample_rate == sample_rate
    opt = DPOptimizer(spec.build(model.parameters(), plan), noise_multiplier=0.0, max_grad_norm=dp.max_grad_norm,
                      expected_batch_size=plan.expected_batch_size, loss_reduction="mean")
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(wrapped(data.normalize(data.images[idx])), data.labels[idx]).backward()
    opt.step()
    return model


SLOW = pytest.mark.slow
# (model, the backend the fast engine must pick, the Opacus mode of the reference)
ENGINE_CASES = [
    pytest.param("torchvision:resnet18", "manual", "ew", id="resnet18"),
    pytest.param("torchvision:mobilenet_v3_small", "vmap", "ew", id="mobilenet_v3_small", marks=SLOW),
    pytest.param("torchvision:efficientnet_b0", "vmap", "ew", id="efficientnet_b0", marks=SLOW),
    pytest.param("torchvision:convnext_tiny", "vmap", "functorch", id="convnext_tiny", marks=SLOW),
    pytest.param("torchvision:vit_b_16", "manual", "hooks", id="vit_b_16", marks=SLOW),
    pytest.param("tiny_vit", "manual", "hooks", id="tiny_vit"),
    pytest.param("user", "vmap", "hooks", id="user_module"),
]


def tiny_vit() -> nn.Module:
    """torchvision's ViT at 32x32 in 4 patches, 2 blocks of width 8, random weights everywhere (torchvision starts
    the head at zero, which would leave every other gradient of the first step 0)."""
    from torchvision.models import VisionTransformer

    model = make_dp_compatible(VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=8, mlp_dim=16, num_classes=3), "tiny_vit")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


OWN_MODELS = {"user": lambda: make_dp_compatible(UserNet(), "user"), "tiny_vit": tiny_vit}


@pytest.mark.parametrize(("name", "backend", "reference"), ENGINE_CASES)
def test_fast_engine_update_equals_opacus(name, backend, reference):
    torch.manual_seed(0)
    model = OWN_MODELS[name]() if name in OWN_MODELS else resolve_model(name, **SIZES)
    model = _no_randomness(model)
    data = make_data(8, (3, 32, 32), 3)
    spec, dp = OptimizerSpec(lr=0.5), DP(noise_multiplier=0.0, max_grad_norm=0.05)
    explicit = {"grad_sample_mode": "manual"} if "vit" in name else {}  # a ViT's token rules are opt-in
    fast = fast_engine(model=copy.deepcopy(model), train_data=data, batch_size=3, optimizer=spec, dp=dp,
                       seed=3, device="cpu", **explicit)
    assert isinstance(fast, FastEngine) and fast.grad_sample_mode == backend
    fast.train_epoch(max_steps=1)
    mask = torch.rand(1, len(data), generator=make_generator(3, "sampling"))[0] < fast.sample_rate
    idx = mask.nonzero()[:, 0]
    assert fast.last_batch_sizes == [len(idx)] and len(idx) >= 2
    ref = opacus_step(copy.deepcopy(model), data, idx, mode=reference, spec=spec, dp=dp,
                      sample_rate=fast.sample_rate)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    update_fast = torch.cat([p.detach().reshape(-1) for p in fast.model.parameters()]) - start
    update_ref = torch.cat([p.detach().reshape(-1) for p in ref.parameters()]) - start
    # The update is lr * (sum of clipped gradients) / E[B]: norm <= lr C |batch| / E[B] ~ 0.03 here.
    assert update_ref.norm() > 1e-3
    diff = float((update_fast - update_ref).abs().max())
    print(f"{name}: {backend} backend, max |fast - opacus ({reference})| = {diff:.3g}, |update| = "
          f"{float(update_ref.norm()):.3g}")
    assert diff < 1e-6
    assert (update_fast - update_ref).norm() < 1e-4 * update_ref.norm()


# ----------------------------------------------------------------- what the engine must still learn (integrator)


def test_dropout_models_stay_on_the_fast_engine_with_per_example_masks():
    """torchvision's defaults keep dropout/stochastic depth: each example's gradient under its own mask is exactly
    what DP-SGD clips (no example's mask depends on another's); today vmap refuses the random op and the engine
    falls back to Opacus, whose full backward hooks refuse MobileNet's in-place residual additions."""
    torch.manual_seed(0)
    model = resolve_model("torchvision:mobilenet_v3_small", **SIZES)
    data = make_data(8, (3, 32, 32), 3)
    fast = fast_engine(model=model, train_data=data, batch_size=3, optimizer=OptimizerSpec(lr=0.5),
                        dp=DP(noise_multiplier=1.0, max_grad_norm=1.0), seed=3, device="cpu")
    assert isinstance(fast, FastEngine) and fast.grad_sample_mode == "vmap"
    assert fast.train_epoch(max_steps=1).steps == 1


def test_stochastic_depth_draws_a_mask_per_example_and_stays_on_the_fast_engine():
    """torchvision's StochasticDepth (ConvNeXt, EfficientNet) draws in place, which vmap refused: the fast engine
    had no backend for such models (and Opacus's functorch path refuses any random op)."""
    from torchvision.ops import StochasticDepth

    from dpvision.models.external import PerExampleStochasticDepth

    torch.manual_seed(0)
    model = make_dp_compatible(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), StochasticDepth(0.5, "row"),
                                             nn.Flatten(), nn.Linear(4 * 8 * 8, 3)), "sd")
    depth = model[1]
    assert isinstance(depth, PerExampleStochasticDepth) and (depth.p, depth.mode) == (0.5, "row")
    x = torch.ones(64, 2, 3, 3)
    per_example = torch.func.vmap(lambda xi: depth(xi.unsqueeze(0)).squeeze(0), randomness="different")(x)
    kept = per_example.flatten(1).ne(0).all(1)  # [64]: each example's own draw, all or nothing
    assert 16 < int(kept.sum()) < 48 and per_example.flatten(1).ne(0).any(1).equal(kept)
    assert torch.equal(per_example[kept], 2 * x[kept])  # survivors scaled by 1 / (1 - p)
    assert torch.equal(depth.eval()(x), x)
    data = make_data(8, (3, 8, 8), 3)
    fast = fast_engine(model=model.train(), train_data=data, batch_size=3, optimizer=OptimizerSpec(lr=0.5),
                       dp=DP(noise_multiplier=1.0, max_grad_norm=1.0), seed=3, device="cpu",
                       grad_sample_mode="vmap")  # what ConvNeXt's LayerNorm2d, EfficientNet's depthwise convs get
    assert fast.grad_sample_mode == "vmap" and fast.train_epoch(max_steps=1).steps == 1


class ProbeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_linear_probe_on_the_fast_engine_equals_opacus():
    """A linear probe: only the head's gradients are clipped (the norm over trainable parameters, as Opacus's
    DPOptimizer does), P counts only them, and the frozen body does not move."""
    from dpvision.models.init import set_trainable

    torch.manual_seed(0)
    model = ProbeNet()
    set_trainable(model, "linear_probe", head_name="head")
    data = make_data(8, (3, 8, 8), 3)
    spec, dp = OptimizerSpec(lr=0.5), DP(noise_multiplier=0.0, max_grad_norm=0.05)
    fast = fast_engine(model=copy.deepcopy(model), train_data=data, batch_size=3, optimizer=spec, dp=dp,
                        seed=3, device="cpu")
    assert isinstance(fast, FastEngine) and fast.num_params == model.head.weight.numel() + 3
    fast.train_epoch(max_steps=1)
    mask = torch.rand(1, len(data), generator=make_generator(3, "sampling"))[0] < fast.sample_rate
    ref = copy.deepcopy(model)
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    idx = mask.nonzero()[:, 0]
    wrapped = GradSampleModule(ref, batch_first=True, loss_reduction="mean")
    opt = DPOptimizer(spec.build([p for p in ref.parameters() if p.requires_grad], fast.plan), noise_multiplier=0.0,
                      max_grad_norm=dp.max_grad_norm, expected_batch_size=fast.plan.expected_batch_size,
                      loss_reduction="mean")
    nn.functional.cross_entropy(wrapped(data.normalize(data.images[idx])), data.labels[idx]).backward()
    opt.step()
    assert torch.equal(fast.model.body[0].weight, model.body[0].weight)
    assert torch.allclose(fast.model.head.weight, ref.head.weight, atol=1e-7)
    assert not torch.equal(ref.head.weight, model.head.weight)

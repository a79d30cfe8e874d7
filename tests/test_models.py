"""The model registry and the model-side DP techniques (CPU, tiny sizes).

Every model: shapes, Opacus's ModuleValidator, per-sample gradients from Opacus's hooks equal to
``torch.func.vmap`` (this catches a weight-standardised conv differentiated at its standardised
kernel), and one epoch of the fast engine equal to one of the stock Opacus engine. Then the
techniques one by one: activations, weight standardisation, the scattering transform.

Per-sample gradients are compared in float64: in float32 a ReLU input within ~1e-6 of zero can
change sign between a batched and a one-example forward, which changes that example's gradient by
~1e-3 (seen on WRN-16-4) without anything being wrong. The engine comparisons run in float32 and
so use smooth activations for the deep models.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.func import functional_call, grad, vmap

from dpvision.data.tensors import ImageTensors
from dpvision.engines import OptimizerSpec, UnsupportedModelError, build_engine
from dpvision.engines.fast import FastEngine
from dpvision.engines.per_sample import ManualPerSample
from dpvision.models import (
    ACTIVATIONS, DEFAULT_ACTIVATION, MODELS, CelebaCNN, SampleConvNet, Scattering2D, TemperedSigmoid, WSConv2d,
    build_model, check_model_options, make_activation, standardize_weight,
)  # fmt: skip
from dpvision.models.scattering import scattering_channels
from tests.engine_helpers import DP, plan_for

# (name, in_channels, num_classes, image_size, options)
SHAPE_CASES = [
    ("sample_convnet", 1, 10, 28, {}), ("sample_convnet", 3, 2, 32, {}), ("sample_convnet", 1, 10, 14, {}),
    ("celeba_cnn", 3, 2, 64, {}), ("celeba_cnn", 1, 10, 16, {"width": 8}),
    ("wrn16_4", 3, 10, 32, {}), ("wrn16_4", 1, 2, 8, {"weight_standardization": True}),
    ("scatternet_cnn", 1, 10, 28, {}), ("scatternet_cnn", 3, 10, 32, {}), ("scatternet_cnn", 2, 5, 8, {}),
    ("scatternet_linear", 1, 10, 28, {}), ("scatternet_linear", 3, 4, 16, {}),
]  # fmt: skip
# Tiny versions of every model and technique, for the gradient comparisons.
TINY_CASES = [
    ("sample_convnet", 1, 10, 14, {}),
    ("celeba_cnn", 3, 2, 16, {"width": 8}),
    ("celeba_cnn", 2, 3, 16, {"width": 8, "weight_standardization": True, "activation": "tempered_sigmoid"}),
    ("wrn16_4", 3, 10, 8, {}),
    ("wrn16_4", 3, 10, 8, {"weight_standardization": True}),
    ("scatternet_cnn", 1, 10, 8, {}),
    ("scatternet_cnn", 3, 10, 8, {"activation": "relu"}),
    ("scatternet_linear", 1, 10, 8, {}),
]


def case_id(case) -> str:
    name, c, k, s, opts = case
    return f"{name}-{c}x{s}x{s}-{k}" + "".join(f"-{v if v is not True else key}" for key, v in opts.items())


def make(case, seed: int = 0) -> nn.Module:
    name, c, k, s, opts = case
    torch.manual_seed(seed)
    return build_model(name, in_channels=c, num_classes=k, image_size=s, **opts)


def batch(case, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    _, c, k, s, _ = case
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, s, s, generator=g), torch.randint(0, k, (n,), generator=g)


def vmap_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)  # name -> [B, *shape]


def opacus_per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    with warnings.catch_warnings():  # the first layer's hook fires though its input needs no grad: harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
    out = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
    gsm._close()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ registry
def test_registry_names_and_defaults():
    assert set(MODELS) >= {"sample_convnet", "celeba_cnn", "wrn16_4", "scatternet_cnn", "scatternet_linear"}
    assert set(DEFAULT_ACTIVATION) == set(MODELS) and ACTIVATIONS == ("relu", "tanh", "tempered_sigmoid")
    assert DEFAULT_ACTIVATION["scatternet_cnn"] == "tanh"  # Tramèr & Boneh's choice


@pytest.mark.parametrize("case", SHAPE_CASES, ids=case_id)
def test_shapes(case):
    model = make(case)
    x, _ = batch(case, 2)
    out = model(x)
    assert out.shape == (2, case[2]) and torch.isfinite(out).all()


def test_parameter_counts():
    assert sum(p.numel() for p in make(("sample_convnet", 1, 10, 28, {})).parameters()) == 26010  # Opacus example
    assert sum(p.numel() for p in make(("wrn16_4", 3, 10, 32, {})).parameters()) == 2_751_562  # "2.7M"
    # Tramèr & Boneh: ScatterNet+CNN 33K (MNIST) and 187K (CIFAR-10) parameters; linear 81 * 7 * 7 * 10 + 10.
    assert sum(p.numel() for p in make(("scatternet_cnn", 1, 10, 28, {})).parameters()) == 33_066
    assert sum(p.numel() for p in make(("scatternet_cnn", 3, 10, 32, {})).parameters()) == 187_210
    assert sum(p.numel() for p in make(("scatternet_linear", 1, 10, 28, {})).parameters()) == 39_700


def test_registry_defaults_are_the_original_models():
    """Same seed, same weights as the classes the golden runs were made with (CelebA: the trainer's width 16)."""
    for built, original in ((make(("sample_convnet", 1, 10, 28, {})), SampleConvNet),
                            (make(("celeba_cnn", 3, 2, 64, {})), lambda: CelebaCNN(2, width=16, groups=8))):
        torch.manual_seed(0)
        reference = original().state_dict()
        state = built.state_dict()
        assert list(state) == list(reference) and all(torch.equal(state[k], reference[k]) for k in state)
    # The classes' own defaults are unchanged too (MNIST 28x28 -> 10, CelebA 64x64 -> 2 at width 32).
    assert SampleConvNet()(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    celeba = CelebaCNN()
    assert celeba(torch.zeros(2, 3, 64, 64)).shape == (2, 2) and celeba.head.in_features == 4 * 32
    assert ModuleValidator.validate(celeba, strict=True) == []


@pytest.mark.parametrize("case", SHAPE_CASES + TINY_CASES, ids=case_id)
def test_opacus_module_validator_accepts_every_model(case):
    assert ModuleValidator.validate(make(case), strict=True) == []


BAD_OPTIONS = [
    (dict(name="resnet50"), r"model\.name must be one of"),
    (dict(name="celeba_cnn", width=12), r"model\.width must be a positive multiple of 8 .*for celeba_cnn, got 12"),
    (dict(name="celeba_cnn", width=10_000), r"model\.width"),
    (dict(name="wrn16_4", width=4), r"model\.width must be unset for wrn16_4"),
    (dict(name="wrn16_4", activation="gelu"), r"model\.activation must be one of"),
    (dict(name="scatternet_linear", activation="tanh"), r"model\.activation must be unset for scatternet_linear"),
    (dict(name="scatternet_cnn", image_size=30), r"model\.image_size must be a multiple of 4"),
    (dict(name="sample_convnet", image_size=12), r"model\.image_size must be an integer in 14\.\.512"),
    (dict(name="wrn16_4", image_size=100_000), r"model\.image_size"),
    (dict(name="wrn16_4", image_size=32.0), r"model\.image_size"),
    (dict(name="wrn16_4", in_channels=0), r"model\.in_channels"),
    (dict(name="wrn16_4", in_channels=True), r"model\.in_channels"),
    (dict(name="wrn16_4", num_classes=1), r"model\.num_classes"),
    (dict(name="sample_convnet", weight_standardization=True), r"model\.weight_standardization is only"),
    (dict(name="wrn16_4", weight_standardization="yes"), r"model\.weight_standardization must be true or false"),
    (dict(name="scatternet_linear", in_channels=16, image_size=512, num_classes=10_000), r"weights"),
]


@pytest.mark.parametrize(("options", "match"), BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_bad_options_are_refused_naming_the_field(options, match):
    kwargs = dict(in_channels=3, num_classes=10, image_size=32, activation=None, width=None,
                  weight_standardization=False)
    kwargs.update(options)
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match) as err:
        check_model_options(name, **kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)


def test_good_options_pass_the_check():
    for name, c, k, s, opts in SHAPE_CASES + TINY_CASES:
        full = dict(activation=None, width=None, weight_standardization=False) | opts
        assert check_model_options(name, in_channels=c, num_classes=k, image_size=s, **full) is None


# ------------------------------------------------------------------ per-sample gradients, engines
@pytest.mark.parametrize("case", TINY_CASES, ids=case_id)
def test_opacus_per_sample_gradients_equal_vmap(case):
    model = make(case).double()
    x, y = batch(case, 4)
    x = x.double()
    expected = vmap_per_sample(model, x, y)
    got = opacus_per_sample(model, x, y)
    assert list(got) == list(expected)
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in expected.values()))
    assert total > 0
    for name in expected:  # a bias right before a GroupNorm has an exactly-zero gradient: absolute floor
        assert (got[name] - expected[name]).norm() <= 1e-5 * expected[name].norm() + 1e-12 * total, name


def test_ws_gradient_is_taken_through_the_standardisation():
    """Standardisation ignores a shift or a rescaling of each output channel's kernel, so the true
    per-sample gradient of the raw kernel is orthogonal to both; the gradient at the standardised
    kernel (what Opacus's Conv2d formula would give) is not, so the comparison above would fail."""
    torch.manual_seed(3)
    ws = nn.Sequential(WSConv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    g = opacus_per_sample(ws, x, y)["0.weight"].flatten(2)  # [B, C_out, fan_in]
    w = ws[0].weight.detach().flatten(1)  # [C_out, fan_in]
    assert g.sum(2).abs().max() < 1e-10 * g.abs().max()
    assert (g * (w - w.mean(1, keepdim=True))).sum(2).abs().max() < 1e-10 * g.abs().max()

    plain = copy.deepcopy(ws)
    plain[0] = nn.Conv2d(2, 4, 3).double()
    with torch.no_grad():
        plain[0].weight.copy_(ws[0].standardized_weight())
        plain[0].bias.copy_(ws[0].bias)
    assert torch.allclose(plain(x), ws(x))  # same function
    naive = opacus_per_sample(plain, x, y)["0.weight"].flatten(2)
    assert naive.sum(2).abs().max() > 1e-3 * naive.abs().max()
    assert rel(naive, g) > 0.1


# Smooth activations for the deep models (float32, see the module docstring); the fast engine's backend.
ENGINE_CASES = [
    (("sample_convnet", 1, 10, 28, {}), "manual"),
    (("celeba_cnn", 3, 2, 16, {"width": 8, "activation": "tempered_sigmoid"}), "manual"),
    (("celeba_cnn", 3, 2, 16, {"width": 8, "activation": "tanh", "weight_standardization": True}), "manual"),
    pytest.param(("wrn16_4", 3, 10, 8, {"activation": "tanh"}), "manual", marks=pytest.mark.slow),
    pytest.param(("wrn16_4", 3, 10, 8, {"activation": "tempered_sigmoid", "weight_standardization": True}),
                 "manual", marks=pytest.mark.slow),
    (("scatternet_cnn", 1, 10, 12, {}), "manual"),
    (("scatternet_cnn", 3, 10, 8, {}), "manual"),
    (("scatternet_linear", 1, 10, 12, {}), "manual"),
]


def uint8_data(case, n: int) -> ImageTensors:
    _, c, k, s, _ = case
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g)
    return ImageTensors(images, torch.randint(0, k, (n,), generator=g), (0.5,) * c, (0.25,) * c)


@pytest.mark.parametrize(("case", "backend"), ENGINE_CASES,
                         ids=[case_id(c.values[0] if hasattr(c, "values") else c[0]) for c in ENGINE_CASES])
def test_fast_and_opacus_engines_make_the_same_update(case, backend):
    """batch_size = N: Poisson rate 1, so both engines take every example in their one step (no RNG match needed)."""
    model, data = make(case), uint8_data(case, 4)
    dp = DP(noise_multiplier=0.0, max_grad_norm=1.0)
    updates = {}
    for name in ("fast", "opacus"):
        engine = build_engine(name, model=copy.deepcopy(model), train_data=data, plan=plan_for(data, len(data), dp),
                              optimizer=OptimizerSpec(lr=0.5), seed=7)
        result = engine.train_epoch()
        assert result.steps == 1 and result.examples == len(data)
        if name == "fast":
            assert isinstance(engine, FastEngine) and engine.grad_sample_mode == backend
        updates[name] = torch.cat([(p - q).detach().flatten() for p, q in
                                   zip(engine.model.parameters(), model.parameters())])
    assert updates["opacus"].norm() > 0
    assert rel(updates["fast"], updates["opacus"]) < 1e-5


def test_manual_backend_takes_weight_standardised_convs_through_the_standardisation():
    """A WSConv2d is supported by exact type, its per-example gradients mapped to the raw weight (not the
    plain Conv2d formula's gradient of the standardised kernel); a further Conv2d subclass is refused."""
    assert WSConv2d in ManualPerSample.SUPPORTED

    class OtherConv(nn.Conv2d):
        pass

    with pytest.raises(UnsupportedModelError, match="OtherConv"):
        ManualPerSample(nn.Sequential(OtherConv(1, 2, 3), nn.Flatten()))


# ------------------------------------------------------------------ activations
def test_tempered_sigmoid():
    x = torch.linspace(-6, 6, 101)
    assert torch.allclose(TemperedSigmoid()(x), torch.tanh(x), atol=1e-6)  # s=2, T=2, o=1
    assert torch.allclose(TemperedSigmoid(1.0, 1.0, 0.0)(x), torch.sigmoid(x))
    y = TemperedSigmoid(scale=3.0, temperature=4.0, offset=1.5)(x * 100)
    assert y.min() >= -1.5 and y.max() <= 1.5 and y.min() < -1.49 and y.max() > 1.49
    assert not list(TemperedSigmoid().parameters()) and not list(TemperedSigmoid().buffers())
    with pytest.raises(ValueError, match="scale"):
        TemperedSigmoid(scale=0.0)


@pytest.mark.parametrize("name", ["sample_convnet", "celeba_cnn", "wrn16_4", "scatternet_cnn"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_option_sets_every_activation(name, activation):
    case = (name, 1, 3, 16, {"activation": activation})
    kinds = {nn.ReLU, nn.Tanh, TemperedSigmoid}
    found = {type(m) for m in make(case).modules()} & kinds
    assert found == {type(make_activation(activation))}
    model, relu = make(case), make((name, 1, 3, 16, {"activation": "relu"}))
    x, _ = batch(case, 2)
    assert torch.equal(model(x), relu(x)) == (activation == "relu")  # same seed, same weights
    with pytest.raises(ValueError, match="model.activation"):
        make_activation("swish")


# ------------------------------------------------------------------ weight standardisation
def test_standardize_weight():
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    s = standardize_weight(w)
    assert s.mean(dim=(1, 2, 3)).abs().max() < 1e-12
    assert torch.allclose((s ** 2).sum(dim=(1, 2, 3)), torch.ones(6, dtype=torch.float64))  # fan_in * var = 1
    scale, shift = torch.rand(6, 1, 1, 1, dtype=torch.float64) + 0.5, torch.randn(6, 1, 1, 1, dtype=torch.float64)
    assert torch.allclose(standardize_weight(scale * w + shift), s)  # invariant per output channel


def test_ws_conv_is_a_conv_with_a_standardised_kernel():
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    torch.manual_seed(0)
    ws = WSConv2d(3, 8, 3, stride=2, padding=1)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), ws.parameters()))  # same params, same init
    x = torch.randn(2, 3, 9, 9)
    expected = F.conv2d(x, standardize_weight(ws.weight), ws.bias, stride=2, padding=1)
    assert torch.allclose(ws(x), expected) and not torch.allclose(ws(x), plain(x))
    for name in ("wrn16_4", "celeba_cnn"):
        convs = [m for m in make((name, 3, 2, 16, {"weight_standardization": True})).modules()
                 if isinstance(m, nn.Conv2d)]
        assert convs and all(type(m) is WSConv2d for m in convs)


# ------------------------------------------------------------------ scattering
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (2, 8)])
def test_scattering_shape_and_no_parameters(channels, size):
    scattering = Scattering2D(size)
    out = scattering(torch.rand(3, channels, size, size))
    assert scattering_channels(2, 8) == 81
    assert out.shape == (3, 81 * channels, size // 4, size // 4) and torch.isfinite(out).all()
    assert not list(scattering.parameters()) and len(list(scattering.buffers())) > 0


def test_scattering_channel_count_formula():
    assert [scattering_channels(j, 8) for j in (1, 2, 3)] == [9, 81, 217]
    out = Scattering2D(32, J=3, L=4)(torch.rand(1, 1, 32, 32))
    assert out.shape == (1, 1 + 3 * 4 + 4 * 4 * 3, 4, 4)


def test_scattering_is_deterministic_and_data_independent():
    x = torch.rand(2, 1, 16, 16)
    a, b = Scattering2D(16), Scattering2D(16)
    assert torch.equal(a(x), a(x)) and torch.equal(a(x), b(x))
    assert all(torch.equal(p, q) for p, q in zip(a.buffers(), b.buffers()))


def test_scattering_algebraic_properties():
    s = Scattering2D(16)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    s64 = s.double()
    out = s64(x)
    assert out.dtype == torch.float64  # computes in its buffers' precision
    assert torch.allclose(s64(3 * x), 3 * out)  # positively homogeneous
    assert torch.allclose(s64(-x)[:, 1:], out[:, 1:])  # orders 1-2 are moduli
    assert torch.allclose(s64(-x)[:, 0], -out[:, 0])  # order 0 is linear
    constant = s64(torch.full((1, 1, 16, 16), 0.7, dtype=torch.float64))
    assert torch.allclose(constant[:, 0], torch.tensor(0.7, dtype=torch.float64))  # low-pass keeps the mean
    assert constant[:, 1:].abs().max() < 1e-8  # wavelets have zero mean


def test_scattering_translation_invariance_and_covariance():
    s = Scattering2D(32)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def texture(cx: float) -> torch.Tensor:  # a fast oscillation under a Gaussian window, [1, 1, 32, 32]
        return (torch.cos(math.pi * 0.9 * (xx - cx)) * torch.exp(-((yy - 15) ** 2 + (xx - cx) ** 2) / 18))[None, None]

    x, shifted = texture(15.0), texture(16.0)
    pixel_change = rel(shifted, x)  # ~2: one pixel flips the oscillation
    assert pixel_change > 1.5 and rel(s(shifted), s(x)) < 0.2 * pixel_change
    far = s(texture(19.0))  # 4 pixels = one output step: the features move by one column
    assert rel(far[..., 1:], s(x)[..., :-1]) < 1e-3


def test_scattering_runs_under_vmap_and_refuses_other_sizes():
    s = Scattering2D(12)
    x = torch.rand(3, 2, 12, 12)
    per_example = vmap(lambda xi: s(xi.unsqueeze(0)).squeeze(0))(x)
    assert torch.allclose(per_example, s(x), atol=1e-6)
    with pytest.raises(ValueError, match="12x12"):
        s(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiple of 4"):
        Scattering2D(30)

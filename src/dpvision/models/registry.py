"""The model registry: every model a training job can name, with its options checked before it is built.

=====================  =======================================================  =============
name                   model                                                    default act.
=====================  =======================================================  =============
``sample_convnet``     Opacus's MNIST CNN (fc1 adapted to sizes other than 28)  relu
``celeba_cnn``         4 conv-GroupNorm blocks + global pool (width 16)         relu
``wrn16_4``            WideResNet-16-4, GroupNorm(16), 2.75M parameters          relu
``scatternet_cnn``     ScatterNet (J=2) + Tramèr & Boneh's CNN                   tanh
``scatternet_linear``  ScatterNet (J=2) + linear classifier                      (none)
=====================  =======================================================  =============

``activation=None`` picks the model's default; ``width`` is only for ``celeba_cnn`` (a multiple
of its 8 GroupNorm groups); ``weight_standardization`` only for the models with a GroupNorm after
every convolution (``celeba_cnn``, ``wrn16_4``); ``input_norm="private"`` only for the ScatterNet
models (per-channel statistics released under DP, :mod:`dpvision.models.input_norm`).
:func:`check_model_options` raises a one-line ``ValueError`` naming the ``model.*`` field for anything
else, and bounds every size so that no option can exhaust memory.

Each model is registered once with ``@register_model(name, default_activation=..., ...)``, its
properties (minimum image size, width option, weight standardisation) on the registry entry:
adding a model is one function here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from dpvision.checks import is_int
from dpvision.data.imagefolder import MAX_IMAGE_SIZE
from dpvision.models.convnets import SAMPLE_CONVNET_MIN_SIZE, CelebaCNN, SampleConvNet
from dpvision.models.input_norm import INPUT_NORMS
from dpvision.models.layers import ACTIVATIONS
from dpvision.models.scatternet import ScatterNetCNN, ScatterNetLinear, scatternet_linear_features
from dpvision.models.wide_resnet import WideResNet

SCATTER_MULTIPLE = 4  # the scattering subsamples by 2^J = 4
CELEBA_GROUPS = 8
CELEBA_DEFAULT_WIDTH = 16  # the CelebA trainer's default
# Bounds that keep any configuration within memory (a model is at most ~100M parameters); the image
# side is bounded by the data package's MAX_IMAGE_SIZE.
MAX_IN_CHANNELS = 16
MAX_NUM_CLASSES = 10_000
MAX_CELEBA_WIDTH = 512
MAX_LINEAR_PARAMETERS = 50_000_000  # scatternet_linear grows with C H W x classes


@dataclass(frozen=True)
class Model:
    """One registered model: its builder and the options it takes.

    ``build(in_channels=, num_classes=, image_size=, activation=, width=, weight_standardization=,
    input_norm=)`` receives checked options, ``activation`` already defaulted.
    """

    name: str
    build: Callable[..., nn.Module]
    default_activation: str | None  # None: the model has no activation to choose
    min_image_size: int = 8
    image_multiple: int = 1  # the image side must be a multiple of this
    has_width: bool = False  # model.width is meaningful (a multiple of CELEBA_GROUPS)
    weight_standardization: bool = False  # a GroupNorm follows every conv, so WS may be switched on
    private_input_norm: bool = False  # model.input_norm may be "private" (fixed features, then a normalisation)
    check: Callable[[int, int, int], None] | None = None  # extra (in_channels, num_classes, image_size) bound
    frozen_prefix: bool = False  # its class declares frozen_prefix() (run.cache_features; dpvision.jobs.features)


MODEL_REGISTRY: dict[str, Model] = {}


def register_model(name: str, **properties) -> Callable:
    """Decorator (like timm's ``@register_model``): register ``build(...) -> nn.Module`` as model ``name``."""

    def register(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODEL_REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        MODEL_REGISTRY[name] = Model(name, build, **properties)
        return build

    return register


@register_model("sample_convnet", default_activation="relu", min_image_size=SAMPLE_CONVNET_MIN_SIZE)
def _sample_convnet(*, in_channels, num_classes, image_size, activation, width, weight_standardization,
                    input_norm):
    return SampleConvNet(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                         activation=activation)


@register_model("celeba_cnn", default_activation="relu", min_image_size=16, has_width=True,
                weight_standardization=True)
def _celeba_cnn(*, in_channels, num_classes, image_size, activation, width, weight_standardization,
                    input_norm):
    return CelebaCNN(num_classes, width or CELEBA_DEFAULT_WIDTH, CELEBA_GROUPS, in_channels=in_channels,
                     activation=activation, weight_standardization=weight_standardization)


@register_model("wrn16_4", default_activation="relu", weight_standardization=True)
def _wrn16_4(*, in_channels, num_classes, image_size, activation, width, weight_standardization,
                    input_norm):
    return WideResNet(in_channels=in_channels, num_classes=num_classes, depth=16, widen=4, activation=activation,
                      weight_standardization=weight_standardization)


@register_model("scatternet_cnn", default_activation="tanh", image_multiple=SCATTER_MULTIPLE,
                private_input_norm=True, frozen_prefix=True)
def _scatternet_cnn(*, in_channels, num_classes, image_size, activation, width, weight_standardization,
                    input_norm):
    return ScatterNetCNN(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                         activation=activation, input_norm=input_norm)


def _linear_size(in_channels: int, num_classes: int, image_size: int) -> None:
    weights = scatternet_linear_features(in_channels, image_size) * num_classes
    if weights > MAX_LINEAR_PARAMETERS:
        raise ValueError(f"scatternet_linear would have {weights:,} weights (> {MAX_LINEAR_PARAMETERS:,}): "
                         f"lower model.image_size ({image_size}) or model.num_classes ({num_classes})")


@register_model("scatternet_linear", default_activation=None, image_multiple=SCATTER_MULTIPLE, check=_linear_size,
                private_input_norm=True, frozen_prefix=True)
def _scatternet_linear(*, in_channels, num_classes, image_size, activation, width, weight_standardization,
                    input_norm):
    return ScatterNetLinear(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                            input_norm=input_norm)


MODELS = tuple(MODEL_REGISTRY)
DEFAULT_ACTIVATION = {name: model.default_activation for name, model in MODEL_REGISTRY.items()}


def check_model_options(name: str, *, in_channels: int, num_classes: int, image_size: int,
                        activation: str | None = None, width: int | None = None,
                        weight_standardization: bool = False, input_norm: str = "group") -> None:
    """Raise ``ValueError`` naming the field if model ``name`` cannot be built with these options.

    Builds nothing. ``image_size`` is the side of the (square) input images.

    Example:
        >>> check_model_options("celeba_cnn", in_channels=3, num_classes=2, image_size=64, width=12)
        Traceback (most recent call last):
        ...
        ValueError: model.width must be a positive multiple of 8 (at most 512) for celeba_cnn, got 12
    """
    if name not in MODEL_REGISTRY:
        raise ValueError(f"model.name must be one of {MODELS}, got {name!r}")
    model = MODEL_REGISTRY[name]
    if not is_int(in_channels) or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise ValueError(f"model.in_channels must be an integer in 1..{MAX_IN_CHANNELS}, got {in_channels!r}")
    if not is_int(num_classes) or not 2 <= num_classes <= MAX_NUM_CLASSES:
        raise ValueError(f"model.num_classes must be an integer in 2..{MAX_NUM_CLASSES}, got {num_classes!r}")
    low = model.min_image_size
    if not is_int(image_size) or not low <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"model.image_size must be an integer in {low}..{MAX_IMAGE_SIZE} for {name}, "
                         f"got {image_size!r}")
    if image_size % model.image_multiple:
        raise ValueError(f"model.image_size must be a multiple of {model.image_multiple} for {name} "
                         f"(the scattering subsamples by {model.image_multiple}), got {image_size}")
    if model.default_activation is None and activation is not None:
        raise ValueError(f"model.activation must be unset for {name} (a linear model has none), got {activation!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {activation!r}")
    if model.check is not None:
        model.check(in_channels, num_classes, image_size)
    _check_width_and_ws(model, width, weight_standardization)
    _check_input_norm(model, input_norm)


def _check_input_norm(model: Model, input_norm) -> None:
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"model.input_norm must be one of {', '.join(INPUT_NORMS)}, got {input_norm!r}")
    if input_norm != "group" and not model.private_input_norm:
        names = " and ".join(name for name, m in MODEL_REGISTRY.items() if m.private_input_norm)
        raise ValueError(f"model.input_norm {input_norm} is only available for {names}, not {model.name}")


def _check_width_and_ws(model: Model, width, weight_standardization) -> None:
    if model.has_width:
        if width is not None and (not is_int(width) or not 0 < width <= MAX_CELEBA_WIDTH
                                  or width % CELEBA_GROUPS):
            raise ValueError(f"model.width must be a positive multiple of {CELEBA_GROUPS} (at most "
                             f"{MAX_CELEBA_WIDTH}) for {model.name}, got {width!r}")
    elif width is not None:
        with_width = " and ".join(name for name, m in MODEL_REGISTRY.items() if m.has_width)
        raise ValueError(f"model.width must be unset for {model.name} (only {with_width} has a width option), "
                         f"got {width!r}")
    if not isinstance(weight_standardization, bool):
        raise ValueError(f"model.weight_standardization must be true or false, got {weight_standardization!r}")
    if weight_standardization and not model.weight_standardization:
        ws = " and ".join(name for name, m in MODEL_REGISTRY.items() if m.weight_standardization)
        raise ValueError(f"model.weight_standardization is only available for {ws} "
                         f"(a GroupNorm after every conv), not {model.name}")


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int,
                activation: str | None = None, width: int | None = None,
                weight_standardization: bool = False, input_norm: str = "group") -> nn.Module:
    """Model ``name`` for [B, in_channels, image_size, image_size] inputs and ``num_classes`` logits.

    Options are checked first (:func:`check_model_options`); ``activation=None`` is the model's
    default (``DEFAULT_ACTIVATION``), ``width=None`` is 16 for ``celeba_cnn``. The initial weights
    come from torch's global generator, as for any module (seed it for reproducible runs).

    Example:
        >>> import torch
        >>> model = build_model("wrn16_4", in_channels=3, num_classes=10, image_size=32)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    check_model_options(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                        activation=activation, width=width, weight_standardization=weight_standardization,
                        input_norm=input_norm)
    return MODEL_REGISTRY[name].build(in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                                      activation=activation or DEFAULT_ACTIVATION[name], width=width,
                                      weight_standardization=weight_standardization, input_norm=input_norm)

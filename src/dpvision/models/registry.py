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
every convolution (``celeba_cnn``, ``wrn16_4``). :func:`check_model_options` raises a one-line
``ValueError`` naming the ``model.*`` field for anything else, and bounds every size so that no
option can exhaust memory.
"""

from __future__ import annotations

from torch import nn

from dpvision.models.convnets import SAMPLE_CONVNET_MIN_SIZE, CelebaCNN, SampleConvNet
from dpvision.models.layers import ACTIVATIONS
from dpvision.models.scatternet import ScatterNetCNN, ScatterNetLinear, scatternet_linear_features
from dpvision.models.wide_resnet import WideResNet

MODELS = ("sample_convnet", "celeba_cnn", "wrn16_4", "scatternet_cnn", "scatternet_linear")
DEFAULT_ACTIVATION = {"sample_convnet": "relu", "celeba_cnn": "relu", "wrn16_4": "relu",
                      "scatternet_cnn": "tanh", "scatternet_linear": None}
MIN_IMAGE_SIZE = {"sample_convnet": SAMPLE_CONVNET_MIN_SIZE, "celeba_cnn": 16, "wrn16_4": 8,
                  "scatternet_cnn": 8, "scatternet_linear": 8}
SCATTER_MULTIPLE = 4  # the scattering subsamples by 2^J = 4
WS_MODELS = ("celeba_cnn", "wrn16_4")  # a GroupNorm follows every conv
CELEBA_GROUPS = 8
CELEBA_DEFAULT_WIDTH = 16  # the CelebA trainer's default
# Bounds that keep any configuration within memory (a model is at most ~100M parameters).
MAX_IN_CHANNELS = 16
MAX_NUM_CLASSES = 10_000
MAX_IMAGE_SIZE = 512
MAX_CELEBA_WIDTH = 512
MAX_LINEAR_PARAMETERS = 50_000_000  # scatternet_linear grows with C H W x classes


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_model_options(name: str, *, in_channels: int, num_classes: int, image_size: int,
                        activation: str | None = None, width: int | None = None,
                        weight_standardization: bool = False) -> None:
    """Raise ``ValueError`` naming the field if model ``name`` cannot be built with these options.

    Builds nothing. ``image_size`` is the side of the (square) input images.

    Example:
        >>> check_model_options("celeba_cnn", in_channels=3, num_classes=2, image_size=64, width=12)
        Traceback (most recent call last):
        ...
        ValueError: model.width must be a positive multiple of 8 (at most 512) for celeba_cnn, got 12
    """
    if name not in MODELS:
        raise ValueError(f"model.name must be one of {MODELS}, got {name!r}")
    if not _is_int(in_channels) or not 1 <= in_channels <= MAX_IN_CHANNELS:
        raise ValueError(f"model.in_channels must be an integer in 1..{MAX_IN_CHANNELS}, got {in_channels!r}")
    if not _is_int(num_classes) or not 2 <= num_classes <= MAX_NUM_CLASSES:
        raise ValueError(f"model.num_classes must be an integer in 2..{MAX_NUM_CLASSES}, got {num_classes!r}")
    low = MIN_IMAGE_SIZE[name]
    if not _is_int(image_size) or not low <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"model.image_size must be an integer in {low}..{MAX_IMAGE_SIZE} for {name}, "
                         f"got {image_size!r}")
    if name.startswith("scatternet") and image_size % SCATTER_MULTIPLE:
        raise ValueError(f"model.image_size must be a multiple of {SCATTER_MULTIPLE} for {name} "
                         f"(the scattering subsamples by {SCATTER_MULTIPLE}), got {image_size}")
    if name == "scatternet_linear":
        if activation is not None:
            raise ValueError(f"model.activation must be unset for scatternet_linear (a linear model has none), "
                             f"got {activation!r}")
        weights = scatternet_linear_features(in_channels, image_size) * num_classes
        if weights > MAX_LINEAR_PARAMETERS:
            raise ValueError(f"scatternet_linear would have {weights:,} weights (> {MAX_LINEAR_PARAMETERS:,}): "
                             f"lower model.image_size ({image_size}) or model.num_classes ({num_classes})")
    elif activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"model.activation must be one of {ACTIVATIONS}, got {activation!r}")
    if name == "celeba_cnn":
        if width is not None and (not _is_int(width) or not 0 < width <= MAX_CELEBA_WIDTH
                                  or width % CELEBA_GROUPS):
            raise ValueError(f"model.width must be a positive multiple of {CELEBA_GROUPS} (at most "
                             f"{MAX_CELEBA_WIDTH}) for celeba_cnn, got {width!r}")
    elif width is not None:
        raise ValueError(f"model.width must be unset for {name} (only celeba_cnn has a width option), got {width!r}")
    if not isinstance(weight_standardization, bool):
        raise ValueError(f"model.weight_standardization must be true or false, got {weight_standardization!r}")
    if weight_standardization and name not in WS_MODELS:
        raise ValueError(f"model.weight_standardization is only available for {' and '.join(WS_MODELS)} "
                         f"(a GroupNorm after every conv), not {name}")


def build_model(name: str, *, in_channels: int, num_classes: int, image_size: int,
                activation: str | None = None, width: int | None = None,
                weight_standardization: bool = False) -> nn.Module:
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
                        activation=activation, width=width, weight_standardization=weight_standardization)
    act = activation or DEFAULT_ACTIVATION[name]
    sizes = dict(in_channels=in_channels, num_classes=num_classes)
    if name == "sample_convnet":
        return SampleConvNet(**sizes, image_size=image_size, activation=act)
    if name == "celeba_cnn":
        return CelebaCNN(num_classes, width or CELEBA_DEFAULT_WIDTH, CELEBA_GROUPS, in_channels=in_channels,
                         activation=act, weight_standardization=weight_standardization)
    if name == "wrn16_4":
        return WideResNet(**sizes, depth=16, widen=4, activation=act,
                          weight_standardization=weight_standardization)
    if name == "scatternet_cnn":
        return ScatterNetCNN(**sizes, image_size=image_size, activation=act)
    return ScatterNetLinear(**sizes, image_size=image_size)

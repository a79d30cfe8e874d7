"""Models for DP-SGD image classification, and the registry a training job builds them from.

``build_model(name, in_channels=..., num_classes=..., image_size=...)`` makes any model of
``MODELS`` (each registered once with ``@register_model``); ``check_model_options`` validates the
same options without building anything (see :mod:`dpvision.models.registry`). No model uses BatchNorm or any layer that mixes the
examples of a batch, and every trainable layer has per-sample gradients in Opacus.
"""

from dpvision.models.convnets import CelebaCNN, SampleConvNet
from dpvision.models.layers import ACTIVATIONS, TemperedSigmoid, WSConv2d, make_activation, standardize_weight
from dpvision.models.registry import (
    DEFAULT_ACTIVATION, MODEL_REGISTRY, MODELS, Model, build_model, check_model_options, register_model,
)  # fmt: skip
from dpvision.models.scattering import Scattering2D
from dpvision.models.scatternet import ScatterNetCNN, ScatterNetLinear
from dpvision.models.wide_resnet import WideResNet

__all__ = [
    "ACTIVATIONS", "DEFAULT_ACTIVATION", "MODELS", "MODEL_REGISTRY", "CelebaCNN", "Model", "SampleConvNet",
    "Scattering2D", "ScatterNetCNN", "ScatterNetLinear", "TemperedSigmoid", "WSConv2d", "WideResNet", "build_model",
    "check_model_options", "make_activation", "register_model", "standardize_weight",
]  # fmt: skip

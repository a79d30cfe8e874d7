"""Models from outside the registry: any torchvision classification model, or a user's own factory.

Two kinds of name, both with a colon (registry names have none):

* ``torchvision:<name>`` (``torchvision:resnet18``, ``torchvision:convnext_tiny``, ``torchvision:vit_b_16``,
  ...): one of torchvision's classification models, built with ``weights=None`` (nothing is downloaded;
  start from a checkpoint with ``model.init``, :mod:`dpvision.models.init`), ``num_classes`` from the data,
  and for the ViT family ``image_size`` too (a multiple of the patch size). torchvision's models take 3
  channels: for other inputs the stem (the first ``Conv2d`` with 3 input channels) is replaced by the same
  convolution on ``in_channels``.
* ``<module.path>:<callable>`` (``my_package.models:make_net``): the user's factory, imported and called
  with the keywords it accepts among ``num_classes``, ``in_channels`` and ``image_size``; it must return
  an ``nn.Module``.

Either model is then made DP-compatible the way Opacus does it (:func:`make_dp_compatible`:
``ModuleValidator.fix``, i.e. BatchNorm -> GroupNorm with gcd(32, C) groups, plus in-place activations
off, since Opacus's backward hooks refuse in-place changes of a hooked output, and torchvision's stochastic
depth drawing its mask out of place, so that vmap gives each example its own) and validated with
``ModuleValidator.validate``. Every failure is one ``ValueError`` line naming ``model.name``.

Example:
    >>> model = resolve_model("torchvision:resnet18", in_channels=1, num_classes=10, image_size=28)
    >>> type(model).__name__, model.conv1.in_channels, model.fc.out_features
    ('ResNet', 1, 10)
    >>> sorted({type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__})
    ['GroupNorm']
    >>> resolve_model("wrn16_4", in_channels=3, num_classes=10, image_size=32) is None  # a registry name
    True
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging

import torch
from torch import nn

TORCHVISION = "torchvision"
FACTORY_KEYWORDS = ("num_classes", "in_channels", "image_size")
STEM_CHANNELS = 3  # what every torchvision classification model is built for


def is_external(name: str) -> bool:
    """Whether ``name`` names a model outside the registry (``torchvision:...`` or ``module:callable``)."""
    return isinstance(name, str) and ":" in name


def resolve_model(name: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module | None:
    """The DP-compatible model ``name`` names, or ``None`` when ``name`` is a registry name (no colon).

    ``ValueError`` (one line, naming ``model.name``) for an unknown torchvision name (with close
    matches), a non-classification model, a factory that cannot be imported or called, or a model
    that cannot be made DP-compatible. Initial weights come from torch's global generator.
    """
    if not is_external(name):
        return None
    source, _, target = name.partition(":")
    if source == TORCHVISION:
        model = torchvision_model(target, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    else:
        model = factory_model(source, target, in_channels=in_channels, num_classes=num_classes,
                              image_size=image_size)
    return make_dp_compatible(model, f"model.name {name}")


def check_external(name: str, *, image_size: int) -> None:
    """Every check of :func:`resolve_model` that needs no model built (the job runs it before writing anything):
    the torchvision name and image size, or that the factory imports and is callable."""
    source, _, target = name.partition(":")
    if source == TORCHVISION:
        _check_torchvision(target, image_size)
    else:
        _import_factory(source, target)


def _check_torchvision(arch: str, image_size: int) -> None:
    import torchvision.models  # noqa: PLC0415 (torchvision's model zoo is only needed for these names)

    known = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if arch not in known:
        if arch in torchvision.models.list_models():
            raise ValueError(f"model.name torchvision:{arch} is not a classification model (detection, "
                             "segmentation, video and optical-flow models are not image classifiers)")
        close = difflib.get_close_matches(arch, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join('torchvision:' + c for c in close)}?" if close else \
            f" (the {len(known)} names of torchvision.models.list_models(module=torchvision.models))"
        raise ValueError(f"model.name torchvision:{arch} is not a torchvision classification model{hint}")
    if arch.startswith("vit_") and image_size % _patch_size(arch):
        raise ValueError(f"model.name torchvision:{arch} needs an image size that is a multiple of its patch "
                         f"size {_patch_size(arch)}, got {image_size} (set data.image_size)")


def _patch_size(arch: str) -> int:
    return int(arch.rsplit("_", 1)[-1])  # vit_b_16 -> 16


def torchvision_model(arch: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """torchvision's classification model ``arch``, untrained, for these inputs and classes."""
    import torchvision.models  # noqa: PLC0415 (see _check_torchvision)

    _check_torchvision(arch, image_size)
    kwargs = {"weights": None, "num_classes": num_classes}
    if arch.startswith("vit_"):
        kwargs["image_size"] = image_size
    try:
        model = torchvision.models.get_model(arch, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.name torchvision:{arch} cannot be built for {num_classes} classes: "
                         f"{_first_line(err)}") from None
    if in_channels != STEM_CHANNELS:
        _adapt_stem(model, in_channels, f"torchvision:{arch}")
    return model


def _adapt_stem(model: nn.Module, in_channels: int, name: str) -> None:
    """Replace the first 3-channel Conv2d (the stem) by the same convolution on ``in_channels``."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == STEM_CHANNELS:
                stem = nn.Conv2d(in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                 padding=child.padding, dilation=child.dilation, groups=1,
                                 bias=child.bias is not None, padding_mode=child.padding_mode)
                setattr(parent, child_name, stem)
                return
    raise ValueError(f"model.name {name} has no 3-channel stem convolution to adapt to {in_channels} channels")


def factory_model(module_path: str, attr: str, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """``module_path.attr(**kwargs)`` with the keywords it accepts among ``FACTORY_KEYWORDS``."""
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    return call_factory(_import_factory(module_path, attr), f"model.name {module_path}:{attr}", sizes)


def _import_factory(module_path: str, attr: str):
    name = f"{module_path}:{attr}"
    if not module_path or not attr:
        raise ValueError(f"model.name {name!r} must be torchvision:<name> or <module.path>:<callable>")
    try:
        module = importlib.import_module(module_path)
    except ImportError as err:
        raise ValueError(f"model.name {name}: cannot import module {module_path!r} ({_first_line(err)}); "
                         "is its folder on PYTHONPATH?") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"model.name {name}: module {module_path!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"model.name {name}: {type(factory).__name__} is not callable")
    return factory


def call_factory(factory, label: str, sizes: dict[str, int]) -> nn.Module:
    """``factory(**kwargs)`` with the keywords of ``sizes`` it accepts; ``label`` starts every error line."""
    if not callable(factory):
        raise ValueError(f"{label}: {type(factory).__name__} is not callable")
    try:
        params = inspect.signature(factory).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):  # no signature (a builtin): offer every size
        params, takes_all = {}, True
    try:
        model = factory(**{k: v for k, v in sizes.items() if takes_all or k in params})
    except Exception as err:  # noqa: BLE001 (the user's code: any failure is reported in one line)
        raise ValueError(f"{label}: the factory raised {type(err).__name__}: {_first_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise ValueError(f"{label}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def make_dp_compatible(model: nn.Module, label: str = "model") -> nn.Module:
    """Opacus's ``ModuleValidator.fix`` (BatchNorm -> GroupNorm, ...), in-place activations off, stochastic depth
    per example (:class:`PerExampleStochasticDepth`), validated.

    ``ValueError`` starting with ``label`` and Opacus's first complaint when the model cannot be fixed.
    Returns the fixed model (Opacus replaces modules in place where it can, so use the return value).
    """
    from opacus.validators import ModuleValidator  # noqa: PLC0415 (Opacus is heavy; only these models need it)

    model.train()
    opacus_log = logging.getLogger("opacus.validators.module_validator")
    level = opacus_log.level
    opacus_log.setLevel(logging.ERROR)  # fix() logs every replacement at INFO
    try:
        fixed = ModuleValidator.fix(model)
    except Exception as err:  # noqa: BLE001 (any failure of a fixer means "cannot be made compatible")
        raise ValueError(f"{label} cannot be made DP-compatible: {_first_line(err)}") from None
    finally:
        opacus_log.setLevel(level)
    for module in fixed.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False
    _per_example_stochastic_depth(fixed)
    errors = ModuleValidator.validate(fixed, strict=False)
    if errors:
        raise ValueError(f"{label} cannot be made DP-compatible: {_first_line(errors[0])}")
    mixing = [type(m).__name__ for m in fixed.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if mixing:
        raise ValueError(f"{label} cannot be made DP-compatible: {mixing[0]} mixes the examples of a batch")
    return fixed


class PerExampleStochasticDepth(nn.Module):
    """torchvision's ``StochasticDepth`` (same ``p`` and ``mode``) with its mask drawn out of place.

    torchvision draws it in place (``bernoulli_`` on a fresh tensor), which ``torch.func.vmap`` refuses to
    make per-example; out of place, the fast engine's vmap (``randomness="different"``) gives every example
    its own draw, so example i's gradient is that of its own network (what DP-SGD clips).
    """

    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        # "row": a draw per example, [B, 1, ..., 1]; "batch": one draw for the whole batch.
        size = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        keep = (torch.rand(size, dtype=x.dtype, device=x.device) < survival).to(x.dtype)
        return x * keep / survival if survival > 0 else x * keep


def _per_example_stochastic_depth(model: nn.Module) -> None:
    """Every torchvision ``StochasticDepth`` (ConvNeXt, EfficientNet) replaced by :class:`PerExampleStochasticDepth`."""
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            kind = type(child)
            if kind.__name__ == "StochasticDepth" and kind.__module__.startswith("torchvision."):
                setattr(parent, name, PerExampleStochasticDepth(child.p, child.mode))


def _first_line(err: object) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


__all__ = ["FACTORY_KEYWORDS", "TORCHVISION", "PerExampleStochasticDepth", "call_factory", "check_external",
           "factory_model", "is_external", "make_dp_compatible", "resolve_model", "torchvision_model"]

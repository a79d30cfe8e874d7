"""The Python entry point: ``dpvision.fit(model, train, test)`` runs the one training job on your own model and data.

The same job as ``dpvision train`` (:func:`dpvision.jobs.train.run`): Poisson sampling, per-example clipping,
noise, the accountants side by side, the run folder (``config.yaml``, ``metrics.csv``, ``summary.json``,
``model.pt``, ``checkpoint.pt``) and ``resume``. Only where the model and the data come from differs:

* ``model``: an ``nn.Module`` (trained in place, as with Opacus; it must already be DP-compatible:
  ``make_dp_compatible(model)`` does what Opacus's ``ModuleValidator.fix`` does), a factory (called with the
  keywords it accepts among ``num_classes``, ``in_channels``, ``image_size``, then made DP-compatible), or a
  name (a registry model, ``torchvision:resnet18``, ``my_package.models:make_net``);
* ``train``, ``test``, ``val``: ``(images, labels)`` tensors (images uint8 [N, C, H, W], or float in [0, 1]
  as ``ToTensor`` gives them, stored as uint8 ``round(255 x)``; labels integer [N]), an
  :class:`~dpvision.data.tensors.ImageTensors`, or a map-style ``Dataset`` of ``(image, label)`` with tensor
  or PIL images of one size. Every split is normalised with fixed constants, (x - 0.5) / 0.5 per channel:
  never with statistics of the (private) training set, which no accountant would cover (docs/privacy.md).
* ``config``: a :class:`~dpvision.jobs.config.TrainConfig`, a recipe (YAML path) or a dict of sections; then
  keyword sections override it the way ``--set`` does: ``fit(..., optim={"epochs": 3}, dp={"target_epsilon": 3})``
  (every section but ``model``, whose name is ``fit``'s first argument).

Example:
    >>> import torch, dpvision                                                        # doctest: +SKIP
    >>> summary = dpvision.fit(torch.nn.Sequential(...), (x_train, y_train), (x_test, y_test),  # doctest: +SKIP
    ...                        optim={"epochs": 1}, dp={"target_epsilon": 3.0})
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
from torch import nn

from dpvision.data.files import DataError, check_total_bytes
from dpvision.data.registry import data_fingerprint
from dpvision.data.tensors import ImageTensors, neutral_stats
from dpvision.engines.contrastive import PROJECTION_DIM
from dpvision.jobs.config import SECTIONS, TrainConfig, load_recipe
from dpvision.jobs.setup import Data, Given
from dpvision.models.external import call_factory, make_dp_compatible
from dpvision.seeding import seed_everything

PYTHON_DATASET = "python"  # config.data.dataset of data handed over from Python
MAX_CLASSES = 10_000


def fit(model: nn.Module | Callable[..., nn.Module] | str, train: Any, test: Any, val: Any = None, *,
        config: TrainConfig | str | os.PathLike | Mapping | None = None, classes: list[str] | None = None,
        resume: str | os.PathLike | None = None, **sections: Mapping[str, Any]) -> dict:
    """Train ``model`` on ``train`` with DP-SGD (or without, ``dp={"enabled": False}``); return the summary.

    ``classes``: the class names (default ``"0"``, ``"1"``, ...). ``resume``: a run folder to continue with
    its saved config (give the same model and data; ``sections`` may then change only what ``--resume``
    lets change). ``model``'s own options (``activation``, ``width``) go in ``config``'s ``model`` section.
    The summary is ``summary.json``'s content (test accuracy, ε, δ, σ, ...), or, when ``run={"max_minutes": M}``
    ended the sitting before the last epoch, ``{"status": "paused", "run_dir": ..., "epoch": ...}``: call again
    with ``resume=`` that folder (and ``run={"max_minutes": M}`` for another sitting).
    """
    from dpvision.jobs.train import run  # noqa: PLC0415 (the job pulls in matplotlib and the accountants)

    overrides = _section_overrides(sections)
    data = make_data(train, test, val, classes=classes)
    if resume is not None:  # the weights come from the checkpoint
        module = _model(model, data, seed=0, outputs=_outputs(_saved_objective(resume), data))[0]
        return run(None, resume=resume, overrides=overrides, given=Given(data, module))
    config = _config(config).with_overrides(overrides)
    module, name = _model(model, data, seed=config.run.seed, outputs=_outputs(config.optim.objective, data))
    config = config.with_overrides({"data.dataset": PYTHON_DATASET, "model.name": name})
    return run(config, given=Given(data, module))


def _section_overrides(sections: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{"section.field": value}`` from fit's keyword sections (``optim={...}``, ``dp={...}``, ...)."""
    overrides = {}
    for section, values in sections.items():
        if section not in SECTIONS or section == "model":
            raise ValueError(f"fit() got an unexpected keyword {section!r} (valid: val, config, classes, resume, "
                             f"and the sections {', '.join(s for s in SECTIONS if s != 'model')})")
        if not isinstance(values, Mapping):
            raise ValueError(f"fit({section}=...) must be a dict of settings, got {type(values).__name__}")
        overrides.update({f"{section}.{key}": value for key, value in values.items()})
    return overrides


def _config(config) -> TrainConfig:
    """The base config: a TrainConfig, a recipe path, a dict of sections, or the defaults."""
    if config is None:
        return TrainConfig()
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(config)
    if isinstance(config, (str, os.PathLike)):
        return TrainConfig.from_dict(load_recipe(config), source=str(config))
    raise ValueError(f"config must be a TrainConfig, a recipe path or a dict, got {type(config).__name__}")


def _outputs(objective: str | None, data: Data) -> int:
    """The model's outputs: the classes, or the contrastive objective's projection."""
    return PROJECTION_DIM if objective == "contrastive" else len(data.class_names)


def _saved_objective(resume) -> str | None:
    """The objective in a run folder's config.yaml (None where it cannot be read: the job then says why)."""
    try:
        return (load_recipe(os.path.join(resume, "config.yaml")).get("optim") or {}).get("objective")
    except (ValueError, AttributeError):
        return None


def _model(model, data: Data, *, seed: int, outputs: int) -> tuple[nn.Module | None, str]:
    """(the module to train or None, ``model.name``): a name (registry, ``torchvision:``, import path) is
    built by the job itself; a factory is called after seeding (as the job seeds its own models) with
    ``num_classes=outputs``."""
    if isinstance(model, str):
        return None, model
    shape = data.train.images.shape
    sizes = {"num_classes": outputs, "in_channels": int(shape[1]), "image_size": int(shape[-1])}
    if isinstance(model, nn.Module):
        _check_compatible(model)
        return model, f"python:{type(model).__name__}"
    if callable(model):
        label = f"python:{getattr(model, '__qualname__', type(model).__name__)}"
        seed_everything(seed)  # the initial weights draw from torch's global generator
        return make_dp_compatible(call_factory(model, label, sizes), label), label
    raise ValueError(f"model must be an nn.Module, a factory or a model name, got {type(model).__name__}")


def _check_compatible(model: nn.Module) -> None:
    from opacus.validators import ModuleValidator  # noqa: PLC0415 (heavy; only here)

    errors = ModuleValidator.validate(model.train(), strict=False)
    if errors:
        raise ValueError(f"model is not DP-compatible ({str(errors[0]).splitlines()[0]}); "
                         "fix it first: model = dpvision.api.make_dp_compatible(model)")


def make_data(train, test, val=None, *, classes: list[str] | None = None) -> Data:
    """The job's :class:`~dpvision.jobs.setup.Data` from tensors, ``ImageTensors`` or datasets (see module doc)."""
    raw = {"train": _as_tensors(train, "train"), "test": _as_tensors(test, "test")}
    if val is not None:
        raw["val"] = _as_tensors(val, "val")
    images, labels = raw["train"]
    if len(images) == 0:
        raise ValueError("train has no examples")
    for split, (x, _) in raw.items():
        if tuple(x.shape[1:]) != tuple(images.shape[1:]):
            raise ValueError(f"{split} images are {list(x.shape[1:])} but train's are {list(images.shape[1:])}")
    top = max(int(y.max()) for _, y in raw.values() if len(y)) + 1
    names = tuple(str(c) for c in classes) if classes is not None else tuple(str(i) for i in range(max(top, 2)))
    if len(names) < 2 or len(names) > MAX_CLASSES or top > len(names):
        raise ValueError(f"labels must be integers in 0..{len(names) - 1} (one per class name; 2..{MAX_CLASSES} "
                         f"classes), got a label {top - 1}")
    mean, std = neutral_stats(int(images.shape[1]))  # data-independent: free in privacy
    splits = {k: ImageTensors(x, y, mean, std) for k, (x, y) in raw.items()}
    return Data(train=splits["train"], val=splits.get("val"), test=splits["test"], class_names=names,
                val_groups=None, test_groups=None, fingerprint=data_fingerprint(splits["train"]))


def _as_tensors(split, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, C, H, W], int64 labels [N]) of one split."""
    if isinstance(split, ImageTensors):
        return split.images, split.labels
    if isinstance(split, (tuple, list)) and len(split) == 2 and isinstance(split[0], torch.Tensor):
        images, labels = split
    elif isinstance(split, torch.utils.data.Dataset) and hasattr(split, "__len__"):
        images, labels = _stack_dataset(split, name)
    else:
        raise ValueError(f"{name} must be (images, labels) tensors, ImageTensors or a map-style Dataset of "
                         f"(image, label), got {type(split).__name__}")
    labels = torch.as_tensor(labels)
    if images.dim() != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"{name}: images must be [N, C, H, W] with labels [N], got {list(images.shape)} and "
                         f"{list(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or (len(labels) and int(labels.min()) < 0):
        raise ValueError(f"{name}: labels must be integers >= 0, got {labels.dtype}")
    return _to_uint8(images.detach().cpu(), name), labels.detach().cpu().long()


def _to_uint8(images: torch.Tensor, name: str) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise ValueError(f"{name}: images must be uint8 or float in [0, 1], got {images.dtype}")
    if images.numel() and not (0 <= float(images.min()) and float(images.max()) <= 1):
        raise ValueError(f"{name}: float images must be in [0, 1] (as ToTensor gives them; dpvision normalises "
                         f"them itself), got values in [{float(images.min()):.3g}, {float(images.max()):.3g}]")
    return images.mul(255).round_().to(torch.uint8)


def _stack_dataset(dataset, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) of a map-style dataset, stacked; bounded by the data memory limit."""
    from torchvision.transforms.functional import pil_to_tensor  # noqa: PLC0415 (only for PIL images)

    n = len(dataset)
    if n == 0:
        raise ValueError(f"{name}: the dataset is empty")
    images, labels = [], []
    for i in range(n):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"{name}[{i}] must be an (image, label) pair, got {type(item).__name__}")
        image = item[0] if isinstance(item[0], torch.Tensor) else pil_to_tensor(item[0])
        if images and image.shape != images[0].shape:
            raise ValueError(f"{name}[{i}] is {list(image.shape)} but {name}[0] is {list(images[0].shape)}: "
                             "resize every image to one size")
        if i == 0:
            try:
                check_total_bytes(n * image.numel(), f"{name} ({n} images)", "pass fewer or smaller images")
            except DataError as err:
                raise ValueError(str(err)) from None
        images.append(_to_uint8(image, f"{name}[{i}]"))
        labels.append(int(item[1]))
    return torch.stack(images), torch.tensor(labels)


__all__ = ["PYTHON_DATASET", "fit", "make_data", "make_dp_compatible"]

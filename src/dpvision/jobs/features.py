"""The frozen-feature cache: a model's fixed leading part computed once per split, only the head trained.

Tramèr & Boneh's ScatterNet models (:mod:`dpvision.models.scatternet`) begin with a scattering transform: no
trainable parameter, deterministic, each example on its own (their normalisation after it stays in the head: a
private one's statistics are set after the cache could be made, or restored on resume). Computed
at every step it dominates the run (about 5 s per 1,024 Fashion-MNIST images on two CPU cores, against well
under a second for the linear head's whole DP-SGD step). With ``run.cache_features`` (``auto``, the default:
on wherever allowed; ``true``: on or a one-line error; ``false``: off) the job computes those features once
per split it uses (train, validation, and test only where the test set is evaluated), in batches of
``optim.eval_batch_size`` behind a progress bar, and the engine and the evaluations feed them to the model
with its prefix switched off (``takes_features``).

A model declares its frozen prefix with the :class:`FrozenPrefix` protocol (a registered model also with
``frozen_prefix=True`` in its registry entry, so a config can be checked without building the model).
The cache is allowed when the model declares one, the prefix has no trainable parameter, and no data
augmentation touches the inputs (``optim.augmult`` 0: with augmentation every step sees new images).

Privacy: the prefix is a fixed, data-independent function applied to each example alone, so the head's
per-example gradients on the cached features are exactly the whole model's on the images (the prefix has
nothing to differentiate); Poisson sampling, clipping to C and the noise are untouched. DP-SGD on the head is
DP-SGD on the whole model: the plan and the privacy ledger are the same with or without the cache.

The model stays one module with one ``state_dict`` (the prefix's buffers included): ``model.pt``, the
checkpoints, the moving average and ``model_best.pt`` are exactly those of a run without the cache, and
:func:`release` switches the prefix back on when the job ends (a module handed over from Python is then
used on images again).

Example:
    >>> from dpvision.models import ScatterNetLinear, SampleConvNet
    >>> isinstance(ScatterNetLinear(), FrozenPrefix), isinstance(SampleConvNet(), FrozenPrefix)
    (True, False)
"""

from __future__ import annotations

import copy
import hashlib
import sys
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from tqdm import tqdm

from dpvision.data import data_fingerprint
from dpvision.jobs.config import TrainConfig

MAX_CACHE_BYTES = 16 << 30  # all cached splits together; above it auto computes the prefix at every step


@runtime_checkable
class FrozenPrefix(Protocol):
    """A model whose leading part is fixed: no trainable parameter, deterministic, per example.

    ``frozen_prefix()`` returns that part as a module (images [B, C, H, W] -> features [B, ...]) built from
    the model's own submodules; while ``takes_features`` is true, ``forward`` takes those features instead of
    images and skips the prefix.
    """

    takes_features: bool

    def frozen_prefix(self) -> nn.Module: ...


@dataclass(frozen=True)
class FeatureTensors:
    """A split's cached features: ``images`` float32 [N, ...] (the prefix's output; named as
    :class:`~dpvision.data.tensors.ImageTensors`' field so engines and evaluation read it alike), ``labels``
    int64 [N]. Already the head's input: :meth:`normalize` leaves them as they are."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...] = ()  # nothing to normalise (the engines' normalisation skips float rows)
    std: tuple[float, ...] = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: torch.Tensor) -> "FeatureTensors":
        return FeatureTensors(self.images[indices], self.labels[indices])

    def normalize(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FeatureStore:
    """Computed features by (split content, prefix, device): a run's own, or one a caller keeps across runs
    on the same data (a tuning loop: ``Given(features=store)``, :mod:`dpvision.jobs.setup`)."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str, str], FeatureTensors] = {}

    def features(self, prefix: nn.Module, data, device: torch.device, *, batch_size: int, name: str,
                 quiet: bool) -> FeatureTensors:
        """``data``'s features under ``prefix`` on ``device``, computed at most once per store."""
        key = (split_key(data), prefix_key(prefix), str(device))
        if key not in self._kept:
            self._kept[key] = compute_features(prefix, data, device, batch_size=batch_size, name=name, quiet=quiet)
        return self._kept[key]


def split_key(data) -> str:
    """What a split's features depend on: its images and labels, and their normalisation constants."""
    return f"{data_fingerprint(data)} {tuple(data.mean)} {tuple(data.std)}"


def prefix_key(prefix: nn.Module) -> str:
    """sha256 of the prefix's structure (its repr: sizes, groups, eps) and of every tensor of its state."""
    digest = hashlib.sha256(repr(prefix).encode())
    for name, tensor in prefix.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def compute_features(prefix: nn.Module, data, device: torch.device, *, batch_size: int, name: str = "train",
                     quiet: bool = False) -> FeatureTensors:
    """``prefix`` applied to every normalised image of ``data`` (an ImageTensors), ``batch_size`` at a time.

    The prefix runs on a copy on ``device`` (the model's own modules stay where they are); memory is the
    output [N, ...] plus one batch's work.
    """
    prefix = copy.deepcopy(prefix).to(device)
    out = None
    with tqdm(total=len(data), desc=f"Features ({name})", unit="image", leave=False, disable=quiet,
              file=sys.stderr) as bar:
        for start in range(0, len(data), batch_size):
            images = data.normalize(data.images[start:start + batch_size].to(device))  # [b, C, H, W]
            features = prefix(images)  # [b, ...]
            if out is None:
                out = torch.empty((len(data), *features.shape[1:]), dtype=torch.float32, device=device)
            out[start:start + len(features)] = features
            bar.update(len(images))
    return FeatureTensors(out, data.labels.to(device))


def refusal(config: TrainConfig, model: nn.Module) -> str | None:
    """Why this run's features cannot be cached (None: they can)."""
    reason = config.feature_cache_refusal()
    if reason is not None:
        return reason
    if not isinstance(model, FrozenPrefix):
        return f"model {config.model.name} declares no frozen prefix (frozen_prefix(), dpvision.jobs.features)"
    if any(p.requires_grad for p in model.frozen_prefix().parameters()):
        return f"the frozen prefix of model {config.model.name} has trainable parameters"
    return None


def feature_bytes(model: FrozenPrefix, data) -> int:
    """Bytes of float32 features for ``data``'s examples (the prefix run on one image, on the CPU)."""
    prefix = copy.deepcopy(model.frozen_prefix()).cpu()
    with torch.no_grad():
        one = prefix(data.normalize(data.images[:1].cpu()))  # [1, ...]
    return 4 * one[0].numel() * len(data)


def cached_data(config: TrainConfig, data, model: nn.Module, device: torch.device, *,
                store: FeatureStore | None = None, quiet: bool = False):
    """``data`` (a :class:`~dpvision.jobs.setup.Data`) with its splits replaced by their features and the
    model switched to take them, where ``run.cache_features`` asks for it and it is allowed; else ``data``.

    ``ValueError`` (one line) when ``run.cache_features`` is true and the cache is not allowed or too large.
    Only the splits the run looks at are computed: the test set only when ``run.evaluate_test``.
    """
    mode = config.run.cache_features
    reason = None if mode is False else refusal(config, model)
    if mode is True and reason is not None:
        raise ValueError(f"run.cache_features true: {reason}; set it to auto or false")
    if mode is False or reason is not None:
        return data
    splits = {"train": data.train, "val": data.val, "test": data.test if config.run.evaluate_test else None}
    splits = {name: split for name, split in splits.items() if split is not None and len(split)}
    size = sum(feature_bytes(model, split) for split in splits.values())
    if size > MAX_CACHE_BYTES:
        if mode is True:
            raise ValueError(f"run.cache_features true: the features would take {size / 2**30:.1f} GiB (more than "
                             f"{MAX_CACHE_BYTES / 2**30:g} GiB); set it to auto or false")
        return data
    store = FeatureStore() if store is None else store
    prefix = model.frozen_prefix()
    cached = {name: store.features(prefix, split, device, batch_size=config.optim.eval_batch_size, name=name,
                                   quiet=quiet) for name, split in splits.items()}
    model.takes_features = True
    return replace(data, **cached)


def release(model: nn.Module) -> None:
    """The model takes images again (its prefix back on); nothing for a model without the cache."""
    if isinstance(model, FrozenPrefix):
        model.takes_features = False

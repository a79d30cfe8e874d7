"""The training job's configuration: five small typed sections, readable as YAML recipes.

A :class:`TrainConfig` is ``data``, ``model``, ``optim``, ``dp`` and ``run``. Each
section validates itself in ``__post_init__`` and names the bad field as
``section.field`` (front-ends translate that into their own flag names). A recipe
is the same thing as YAML; any field can be overridden (``--set optim.lr=0.1``
or a named flag), and an unknown key is an error, never silently ignored.

The baseline is the same config with DP switched off: ``config.deactivated()``.

Example:
    >>> config = TrainConfig.from_dict({"optim": {"epochs": 2}, "dp": {"target_epsilon": 3.0}})
    >>> config.optim.epochs, config.dp.noise_multiplier, config.dp.target_epsilon
    (2, None, 3.0)
    >>> config.deactivated().dp.enabled
    False
    >>> TrainConfig.from_dict({"optim": {"epoch": 2}})
    Traceback (most recent call last):
    ...
    ValueError: optim.epoch is not a setting (valid: name, lr, momentum, epochs, batch_size, eval_batch_size, schedule, warmup_epochs, ema_decay, augmult, objective, temperature)
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from dpvision.checks import is_int, is_number, need
from dpvision.data.registry import DATASETS, MAX_IMAGE_SIZE
from dpvision.engines import ENGINES, OPTIMIZERS
from dpvision.engines.clipping import CLIPPING_RULES
from dpvision.engines.contrastive import MAX_BATCH as CONTRASTIVE_MAX_BATCH
from dpvision.engines.contrastive import OBJECTIVES
from dpvision.engines.options import PRECISIONS as ENGINE_PRECISIONS
from dpvision.engines.schedule import SCHEDULES
from dpvision.models.external import is_external
from dpvision.models.init import HEAD_MODES
from dpvision.models.input_norm import INPUT_NORMS
from dpvision.models.registry import MODEL_REGISTRY, MODELS
from dpvision.privacy.plan import DPSettings

DEVICES = ("auto", "cpu", "cuda")
# Linear probe then full fine-tuning is two runs (the second with model.init: the first's model.pt); their ε add up.
JOB_FINETUNE_MODES = ("all", "linear_probe")
PRECISIONS = ("auto", *ENGINE_PRECISIONS)  # "auto": the fast engine's default on CUDA; the CPU always runs fp32
SELECTIONS = ("last", "best_val")  # which weights the test set judges
MIN_IMAGE_SIZE = 8
MAX_AUGMULT = 64  # augmentations per example: each multiplies the per-example work
MAX_EPOCHS = 100_000  # bounds the work a typo can ask for
MAX_BATCH_SIZE = 1 << 20
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes: anything over 1 MiB is not one
RESOLVED = "resolved"  # the key under which a run folder's config.yaml records what was derived (σ, q, N, ...)


class RecipeLoader(yaml.SafeLoader):
    """YAML as people write numbers (``1e-5`` is a float; plain YAML 1.1 reads it as a string), and a key
    given twice in one mapping is an error naming its line (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: SafeConstructor's own error names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark)
            lines[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "mnist"
    root: str = "data"  # mnist/fashion-mnist/cifar10: torchvision's root; celeba/imagefolder: the folder itself
    image_size: int | None = None  # imagefolder: resize to this (None: the dataset's own size)
    k: int | None = None  # train on a seeded random subset of k training examples (None: all)
    val_size: int = 0  # carve a seeded validation split of this many examples out of the training set
    download: bool = True  # torchvision datasets: download when missing (needs internet)

    def __post_init__(self) -> None:
        need(self.dataset in DATASETS, "data.dataset", f"one of {', '.join(DATASETS)}", self.dataset)
        need(isinstance(self.root, str) and self.root != "", "data.root", "a folder", self.root)
        if self.image_size is not None:
            need(is_int(self.image_size) and MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE,
                  "data.image_size", f"an integer between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}", self.image_size)
        if self.k is not None:
            need(is_int(self.k) and self.k >= 1, "data.k", "a positive integer", self.k)
        need(is_int(self.val_size) and self.val_size >= 0, "data.val_size", "an integer >= 0", self.val_size)
        need(isinstance(self.download, bool), "data.download", "true or false", self.download)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "sample_convnet"  # a registry name, torchvision:<name>, or <module>:<factory>
    activation: str | None = None  # None: the model's default (relu; tanh for scatternet_cnn)
    width: int | None = None  # None: the model's default
    weight_standardization: bool = False
    init: str | None = None  # a state_dict file to start from (read with weights_only=True)
    init_head: str = "keep"  # "reset": the classifier head starts afresh (a checkpoint of other classes)
    finetune: str = "all"  # or "linear_probe": only the classifier head is trained
    input_norm: str = "group"  # ScatterNet models: "private" = channel statistics released under DP (dp.input_norm_*)

    def __post_init__(self) -> None:
        need(self.name in MODELS or is_external(self.name), "model.name",
              f"one of {', '.join(MODELS)}, torchvision:<name> or <module>:<factory>", self.name)
        if self.init is not None:
            need(isinstance(self.init, str) and self.init != "", "model.init", "a state_dict file", self.init)
        need(self.init_head in HEAD_MODES, "model.init_head", f"one of {', '.join(HEAD_MODES)}", self.init_head)
        need(self.finetune in JOB_FINETUNE_MODES, "model.finetune", f"one of {', '.join(JOB_FINETUNE_MODES)}",
              self.finetune)
        if self.width is not None:
            need(is_int(self.width) and 1 <= self.width <= 4096, "model.width", "an integer in [1, 4096]",
                  self.width)
        need(isinstance(self.weight_standardization, bool), "model.weight_standardization", "true or false",
              self.weight_standardization)
        need(self.input_norm in INPUT_NORMS, "model.input_norm", f"one of {', '.join(INPUT_NORMS)}", self.input_norm)


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.15
    momentum: float = 0.0  # SGD only
    epochs: int = 30
    batch_size: int = 256  # under DP the expected (Poisson) batch size: q = 1 / ceil(N / batch_size)
    eval_batch_size: int = 1024
    schedule: str = "constant"  # or "cosine": the lr decays to 0 over the run (after the warm-up)
    warmup_epochs: float = 0.0  # linear lr warm-up over this many epochs
    ema_decay: float | None = None  # evaluate an exponential moving average of the weights (free in privacy)
    augmult: int = 0  # K > 0: K augmentations of each sampled example, gradients averaged before clipping
    # "contrastive": SimCLR's loss on two strong views of each image, to pretrain a prior without DP
    # (dpvision.engines.contrastive); the model's last layer is then a projection, not the classes
    objective: str = "cross_entropy"
    temperature: float | None = None  # the contrastive objective's softmax temperature (None: SimCLR's 0.5)

    def __post_init__(self) -> None:
        need(self.name in OPTIMIZERS, "optim.name", f"one of {', '.join(OPTIMIZERS)}", self.name)
        need(is_number(self.lr) and self.lr >= 0, "optim.lr", "a number >= 0", self.lr)
        need(is_number(self.momentum) and 0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        need(is_int(self.epochs) and 1 <= self.epochs <= MAX_EPOCHS, "optim.epochs",
              f"an integer between 1 and {MAX_EPOCHS}", self.epochs)
        need(is_int(self.batch_size) and 1 <= self.batch_size <= MAX_BATCH_SIZE, "optim.batch_size",
              f"an integer between 1 and {MAX_BATCH_SIZE}", self.batch_size)
        need(is_int(self.eval_batch_size) and 1 <= self.eval_batch_size <= MAX_BATCH_SIZE,
              "optim.eval_batch_size", f"an integer between 1 and {MAX_BATCH_SIZE}", self.eval_batch_size)
        need(self.schedule in SCHEDULES, "optim.schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        need(is_number(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs, "optim.warmup_epochs",
              f"a number between 0 and optim.epochs ({self.epochs})", self.warmup_epochs)
        if self.ema_decay is not None:
            need(is_number(self.ema_decay) and 0 < self.ema_decay < 1, "optim.ema_decay", "a number in (0, 1)",
                  self.ema_decay)
        need(is_int(self.augmult) and 0 <= self.augmult <= MAX_AUGMULT, "optim.augmult",
              f"an integer between 0 and {MAX_AUGMULT}", self.augmult)
        need(self.objective in OBJECTIVES, "optim.objective", f"one of {', '.join(OBJECTIVES)}", self.objective)
        if self.temperature is not None:
            need(self.objective == "contrastive", "optim.temperature",
                 "null unless optim.objective is contrastive (cross-entropy has no temperature)", self.temperature)
            need(is_number(self.temperature) and 0.01 <= self.temperature <= 10, "optim.temperature",
                 "a number between 0.01 and 10", self.temperature)
        if self.objective == "contrastive":
            need(self.batch_size <= CONTRASTIVE_MAX_BATCH, "optim.batch_size",
                 f"at most {CONTRASTIVE_MAX_BATCH} under optim.objective contrastive (a step's views are one chunk)",
                 self.batch_size)


@dataclass(kw_only=True)
class DPConfig(DPSettings):
    """The ``dp`` section: :class:`~dpvision.privacy.plan.DPSettings`, its clipping rule one of the engines'."""

    def __post_init__(self) -> None:
        super().__post_init__()
        need(self.clipping in CLIPPING_RULES, "dp.clipping", f"one of {', '.join(CLIPPING_RULES)}", self.clipping)


@dataclass(kw_only=True)
class RunConfig:
    engine: str = "fast"  # falls back to "opacus" (with a notice) for models it does not support
    device: str = "auto"
    precision: str = "auto"  # CUDA numerics of the fast engine ("auto": its default, TF32); docs/performance.md
    seed: int = 0
    runs_dir: str = "runs"
    run_name: str | None = None  # None: made from the settings; "-2", "-3", ... when taken
    select: str = "last"  # "best_val": the test set judges the weights of the best validation epoch
    test_every_epoch: bool = True  # False: the test set is evaluated once, at the end
    evaluate_test: bool = True  # False: the test set is never looked at (tuning on a validation split)
    quiet: bool = False
    tensorboard: bool = False  # also write TensorBoard events next to metrics.csv (optional extra)
    # A model's frozen prefix (ScatterNet's scattering) computed once per split: auto (where allowed), true, false
    cache_features: str | bool = "auto"
    # A sitting: stop cleanly after the epoch whose successor, as long as it, would end past this many minutes
    # from the job's start (its checkpoint saved; --resume continues). Per invocation: a resume has none unless given.
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        need(self.engine in ENGINES, "run.engine", f"one of {', '.join(ENGINES)}", self.engine)
        need(self.device in DEVICES, "run.device", f"one of {', '.join(DEVICES)}", self.device)
        need(self.precision in PRECISIONS, "run.precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        need(self.precision == "auto" or self.engine == "fast", "run.precision",
              "auto with run.engine opacus (only the fast engine has precision options)", self.precision)
        need(is_int(self.seed) and 0 <= self.seed < 2**63, "run.seed", "an integer in [0, 2**63)", self.seed)
        need(isinstance(self.runs_dir, str) and self.runs_dir != "", "run.runs_dir", "a folder", self.runs_dir)
        if self.run_name is not None:
            need(isinstance(self.run_name, str) and self.run_name not in ("", ".", "..")
                  and "/" not in self.run_name and "\\" not in self.run_name and "\0" not in self.run_name,
                  "run.run_name", "a plain folder name (no path separators)", self.run_name)
        need(self.select in SELECTIONS, "run.select", f"one of {', '.join(SELECTIONS)}", self.select)
        for name in ("test_every_epoch", "evaluate_test", "quiet", "tensorboard"):
            need(isinstance(getattr(self, name), bool), f"run.{name}", "true or false", getattr(self, name))
        need(isinstance(self.cache_features, bool) or self.cache_features == "auto", "run.cache_features",
              "auto, true or false", self.cache_features)
        if self.max_minutes is not None:
            need(is_number(self.max_minutes) and self.max_minutes > 0, "run.max_minutes",
                 "a number of minutes > 0 (or null: no limit)", self.max_minutes)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "dp": DPConfig, "run": RunConfig}


@dataclass(kw_only=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.run.select == "best_val" and self.data.val_size == 0 and self.data.dataset not in ("celeba",
                                                                                                   "imagefolder"):
            raise ValueError("run.select best_val needs a validation split: set data.val_size > 0 "
                             f"({self.data.dataset} ships none)")

        if self.model.input_norm != "private":
            for name in ("input_norm_noise_multiplier", "input_norm_bound"):
                if getattr(self.dp, name) is not None:
                    raise ValueError(f"dp.{name} needs model.input_norm private (it is {self.model.input_norm}): "
                                     f"drop dp.{name}, or set model.input_norm: private")
        if self.optim.objective == "contrastive":
            self._check_contrastive()
        if self.run.cache_features is True:
            self._check_cache()
        if not self.run.evaluate_test and self.run.test_every_epoch:
            raise ValueError("run.evaluate_test false needs run.test_every_epoch false (the test set is not to be "
                             "looked at)")

    def _check_contrastive(self) -> None:
        """The contrastive objective pretrains without DP, on the fast engine, with its own two views."""
        if self.dp.enabled:
            raise ValueError("optim.objective contrastive needs DP off (dp.enabled false, --disable-dp): its loss "
                             "couples the examples of a batch, so there is no per-example gradient to clip; pretrain "
                             "on synthetic or public images, then give the run's model.pt as model.init")
        if self.run.engine != "fast":
            raise ValueError(f"optim.objective contrastive needs run.engine fast (it is {self.run.engine})")
        if self.optim.augmult:
            raise ValueError(f"optim.objective contrastive draws its own two views of each image: set optim.augmult "
                             f"to 0 (it is {self.optim.augmult})")

    def _check_cache(self) -> None:
        """``run.cache_features: true`` only where features can be computed once (dpvision.jobs.features)."""
        reason = self.feature_cache_refusal()
        if reason is not None:
            raise ValueError(f"run.cache_features true: {reason}; set it to auto or false")

    def feature_cache_refusal(self) -> str | None:
        """Why this run's features cannot be cached, as far as the config tells (None: they may be; the model
        built from an external name is checked by dpvision.jobs.features.refusal)."""
        if self.optim.augmult:
            return f"optim.augmult is {self.optim.augmult}: augmentation changes the images at every step"
        if self.optim.objective == "contrastive":
            return "optim.objective is contrastive: its views change the images at every step"
        model = MODEL_REGISTRY.get(self.model.name)
        if model is not None and not model.frozen_prefix:
            with_prefix = ", ".join(name for name, m in MODEL_REGISTRY.items() if m.frozen_prefix)
            return f"model.name {self.model.name} has no frozen prefix (models with one: {with_prefix})"
        return None

    def deactivated(self) -> "TrainConfig":
        """The baseline: this config with DP switched off."""
        return dataclasses.replace(self, dp=self.dp.deactivated())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from nested dicts; unknown sections or fields raise ``ValueError`` naming them.

        The ``resolved`` section of a run folder's ``config.yaml`` is accepted and ignored.
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"{source} must be a mapping of sections ({', '.join(SECTIONS)}), got "
                             f"{type(values).__name__}")
        unknown = set(values) - set(SECTIONS) - {RESOLVED}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]} is not a config section (valid: {', '.join(SECTIONS)})")
        sections = {}
        for name, kind in SECTIONS.items():
            given = values.get(name) or {}
            if not isinstance(given, Mapping):
                raise ValueError(f"{name} must be a mapping of settings, got {type(given).__name__}")
            valid = [f.name for f in fields(kind)]
            for key in given:
                if key not in valid:
                    raise ValueError(f"{name}.{key} is not a setting (valid: {', '.join(valid)})")
            sections[name] = kind(**given)
        return cls(**sections)

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TrainConfig":
        """A new config with ``{"section.field": value}`` applied (validated again)."""
        values = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name:
                raise ValueError(f"{key} is not a setting: use section.field with section one of "
                                 f"{', '.join(SECTIONS)}")
            values[section][name] = value
        return TrainConfig.from_dict(values)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The nested dict of a YAML recipe; ``ValueError`` naming the file (and line) on any problem.

    A recipe is a regular file of at most ``MAX_RECIPE_BYTES``: ``/dev/zero``, a FIFO or a
    huge file is refused before anything is read into memory.
    """
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            info = os.fstat(file.fileno())  # the file opened, not whatever the name points to later
            if not stat.S_ISREG(info.st_mode):
                raise ValueError(f"{path}: a recipe must be a regular file (this is not one)")
            data = file.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:
        raise ValueError(f"{path}: cannot read recipe ({err.strerror or err})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise ValueError(f"{path}: a recipe must be at most {MAX_RECIPE_BYTES // 1024} KiB, this one is larger")
    try:
        values = yaml.load(data.decode("utf-8"), Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: cannot read recipe (not UTF-8 text: {err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: {yaml_problem(err)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)}), got "
                         f"{type(values).__name__}")
    return values


def yaml_problem(err: yaml.YAMLError) -> str:
    r"""One line for a YAML error: what is wrong and where (line and column, counted from 1).

    Example:
        >>> try:
        ...     yaml.load("optim:\n  lr: 0.1\n  lr: 5\n", Loader=RecipeLoader)
        ... except yaml.YAMLError as err:
        ...     print(yaml_problem(err))
        line 3, column 3: duplicate key 'lr' (first given on line 2)
    """
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    kind = "" if problem.startswith("duplicate key") else "not valid YAML: "
    return f"{where}{kind}{problem}"


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML would read it: ``0.1`` -> float, ``true`` -> bool, ``null`` -> None.

    Example:
        >>> parse_value("0.1"), parse_value("true"), parse_value("auto"), parse_value("null")
        (0.1, True, 'auto', None)
        >>> parse_value("1e-5")
        1e-05
    """
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError:
        return text

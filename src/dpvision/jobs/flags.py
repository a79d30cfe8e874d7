"""The one map between command-line flags and config fields, shared by every front-end.

Inside dpvision every setting has one name, its config field (``dp.noise_multiplier``,
``dp.max_grad_norm``, ``dp.target_epsilon``, ``dp.delta``, ...). A front-end spells it as a
flag: :data:`FLAGS` holds each field's flag with its type, help and allowed values (read from
the registries: datasets, models, optimizers, accountants, engines, clipping rules), and a
:class:`FlagMap` is one front-end's spelling of them (the MNIST seed says ``--epsilon`` and
``--max-per-sample-grad-norm``, the CelebA trainer ``--data``). The same map adds the flags
to the front-end's parser, reads the typed values back as ``{field: value}``, and renders the
core's errors in the front-end's words.

Example:
    >>> seed = FlagMap({"dp.target_epsilon": "--epsilon"})
    >>> seed.translate("dp.noise_multiplier must be >= 0; dp.target_epsilon excludes it")
    '--sigma must be >= 0; --epsilon excludes it'
    >>> FlagMap().flag("dp.max_grad_norm"), seed.flag("dp.target_epsilon")
    ('--max-grad-norm', '--epsilon')
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from dpvision.data.registry import DATASETS
from dpvision.engines import ENGINES, OPTIMIZERS
from dpvision.engines.clipping import CLIPPING_RULES
from dpvision.jobs.config import DEVICES, SELECTIONS, TrainConfig
from dpvision.models.layers import ACTIVATIONS
from dpvision.models.registry import MODELS
from dpvision.privacy.accountants import ACCOUNTANT_REGISTRY


@dataclass(frozen=True)
class Flag:
    """A config field as a flag: its usual spelling, type, help and allowed values (None: any)."""

    field: str
    name: str
    type: Callable[[str], Any] = str
    help: str = ""
    choices: Callable[[], Sequence[str]] | None = None  # read from the registry when a parser is built

    @property
    def switch(self) -> bool:
        """A boolean field: a flag without a value that sets it to true."""
        return self.type is bool


FLAGS: dict[str, Flag] = {flag.field: flag for flag in (
    # "python" is data handed over to dpvision.fit, never named on a command line
    Flag("data.dataset", "--dataset", help="dataset", choices=lambda: tuple(d for d in DATASETS if d != "python")),
    Flag("data.root", "--data-root", help="dataset folder (torchvision root; celeba/imagefolder: the folder)"),
    Flag("data.image_size", "--image-size", int, "imagefolder: resize images to PX x PX"),
    Flag("data.k", "--k", int, "train on a seeded random subset of N training examples"),
    Flag("data.val_size", "--val-size", int, "carve a seeded validation split of N examples from train"),
    Flag("model.name", "--model", help=f"model: one of {{{','.join(MODELS)}}}, torchvision:<name> (e.g. "
         "torchvision:resnet18) or <module>:<factory> (your own)"),
    Flag("model.activation", "--activation", help="activation (default: the model's)", choices=lambda: ACTIVATIONS),
    Flag("model.width", "--width", int, "model width (model-specific meaning)"),
    Flag("optim.name", "--optimizer", help="optimizer", choices=lambda: OPTIMIZERS),
    Flag("optim.epochs", "--epochs", int, "training epochs"),
    Flag("optim.batch_size", "--batch-size", int, "batch size; under DP the expected (Poisson) batch size"),
    Flag("optim.eval_batch_size", "--eval-batch-size", int, "batch size for validation and test"),
    Flag("optim.lr", "--lr", float, "learning rate"),
    Flag("optim.momentum", "--momentum", float, "SGD momentum"),
    Flag("dp.noise_multiplier", "--sigma", float, "noise multiplier σ (excludes --target-epsilon)"),
    Flag("dp.target_epsilon", "--target-epsilon", float, "calibrate σ so the whole run ends at this ε"),
    Flag("dp.max_grad_norm", "--max-grad-norm", float, "per-example clipping norm C"),
    Flag("dp.clipping", "--clipping", help="per-example clipping rule", choices=lambda: tuple(CLIPPING_RULES)),
    Flag("dp.delta", "--delta", help="δ, a number in (0, 1/N) or 'auto' for 1/(10 N)"),
    Flag("dp.allow_large_delta", "--allow-large-delta", bool,
         "accept a δ >= 1/N (refused otherwise: the convention is δ well below 1/N)"),
    Flag("dp.accountant", "--accountant", help="the ε reported, calibrated to and budgeted (gdp: an "
         "approximation, not an upper bound)", choices=lambda: tuple(ACCOUNTANT_REGISTRY)),
    Flag("dp.max_epsilon", "--max-epsilon", float, "privacy budget: stop before the step that would exceed it"),
    Flag("run.engine", "--engine", help="training engine (fast falls back to opacus with a notice where "
         "unsupported)", choices=lambda: ENGINES),
    Flag("run.device", "--device", help="device (auto: cuda when available)", choices=lambda: DEVICES),
    Flag("run.seed", "--seed", int, "seed of subset, initialisation, sampling and noise"),
    Flag("run.runs_dir", "--runs-dir", help="run folders go to RUNS_DIR/<group>/<run-name>/"),
    Flag("run.run_name", "--run-name", help="run folder name (default: from the settings; -2, -3... if taken)"),
    Flag("run.select", "--select", help="which weights the test set judges", choices=lambda: SELECTIONS),
    Flag("run.quiet", "--quiet", bool, "no progress bars or per-epoch lines"),
    Flag("run.tensorboard", "--tensorboard", bool,
         "also write TensorBoard events (needs pip install 'dpvision[tensorboard]')"),
    Flag("run.max_minutes", "--max-minutes", float, "a sitting: stop after the epoch whose successor would end "
         "more than MAX_MINUTES after the start (checkpoint saved; --resume RUN_DIR continues)"),
)}


def config_default(field: str) -> Any:
    """The default of config ``field`` (``TrainConfig()``'s value)."""
    section, _, name = field.partition(".")
    return getattr(getattr(TrainConfig(), section), name)


class FlagMap:
    """One front-end's flags: :data:`FLAGS` with some fields spelled its own way (``{field: flag}``)."""

    def __init__(self, spellings: Mapping[str, str] | None = None) -> None:
        unknown = set(spellings or {}) - set(FLAGS)
        if unknown:
            raise ValueError(f"not config fields with a flag: {sorted(unknown)}")
        self.spellings = dict(spellings or {})
        self.added: list[str] = []  # the fields this front-end's parser has, in order

    def flag(self, field: str) -> str:
        return self.spellings.get(field) or FLAGS[field].name

    def add(self, parser: argparse.ArgumentParser, field: str, *, default: Any = None, help: str | None = None,
            **options) -> argparse.Action:
        """Add ``field``'s flag to ``parser`` (type and allowed values from :data:`FLAGS`)."""
        spec = FLAGS[field]
        text = spec.help if help is None else help
        self.added.append(field)
        if spec.switch:
            return parser.add_argument(self.flag(field), action="store_true", default=default, help=text, **options)
        if spec.choices is not None:
            options.setdefault("choices", tuple(spec.choices()))
        return parser.add_argument(self.flag(field), type=spec.type, default=default, help=text, **options)

    def add_all(self, parser: argparse.ArgumentParser, fields: Sequence[str] = tuple(FLAGS)) -> None:
        """Every field's flag with default None (a recipe's value stands), its help naming field and default."""
        for field in fields:
            default = config_default(field)
            shown = "" if default is None or FLAGS[field].switch else f"; default: {default}"
            self.add(parser, field, default=None, help=f"{FLAGS[field].help} ({field}{shown})")

    def values(self, args: argparse.Namespace, fields: Sequence[str] | None = None) -> dict[str, Any]:
        """``{field: value}`` for this parser's flags that hold a value (None: not given, a switch left off)."""
        out = {}
        for field in self.added if fields is None else fields:
            value = getattr(args, self.dest(field))
            if value is not None and not (FLAGS[field].switch and value is False):
                out[field] = value
        return out

    def translate(self, message: str) -> str:
        """``message`` with every config field this front-end has a flag for spelled as that flag."""
        names = {field: self.flag(field) for field in self.added or FLAGS}
        for field in sorted(names, key=len, reverse=True):  # longest first: dp.max_epsilon before dp.max
            message = message.replace(field, names[field])
        return message

    def dest(self, field: str) -> str:
        """The attribute argparse stores ``field``'s flag under (``--max-grad-norm`` -> ``max_grad_norm``)."""
        return self.flag(field)[2:].replace("-", "_")


__all__ = ["FLAGS", "Flag", "FlagMap", "config_default"]

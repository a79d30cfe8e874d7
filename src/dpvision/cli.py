"""Command-line entry points: ``dpvision <subcommand>`` (also ``python -m dpvision``) and ``python mnist.py``.

Subcommands: ``train`` (the one training job), ``sweep`` (a recipe over ε values and seeds), ``mnist``
(the MNIST seed's flags), ``audit``, ``celeba`` (make-demo-archive, build-subset, preprocess, train), each
parsed once by argparse; the flags map onto the config through :mod:`dpvision.jobs.flags`. Bad input exits
with status 2 and one line that names the flag and what would be valid, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import math
import shlex
import sys
from typing import Sequence

from dpvision.audit.cli import add_audit_arguments, run_audit
from dpvision.celeba.cli import add_subcommands as add_celeba_subcommands
from dpvision.cli_support import OneLineParser, given_flags, one_line_warnings
from dpvision.jobs import celeba_seed, mnist_seed
from dpvision.jobs import train as train_job  # train_job.run: looked up at call time (tests wrap it)
from dpvision.jobs.config import SECTIONS, TrainConfig, load_recipe, parse_value
from dpvision.jobs.errors import run_guarded
from dpvision.jobs.flags import FlagMap
from dpvision.jobs.loop import check_resume_flags
from dpvision.jobs.sweep import MAX_RUNS, SWEEP_FIELDS, label, parse_list, sweep

# dpvision train names every field of FLAGS by its usual flag (any other field: --set section.field=value).
TRAIN_FLAGS = FlagMap()
RESUME_FREE_FIELDS = ("data.root", "run.device", "run.quiet", "run.tensorboard", "run.max_minutes")
DP_ONLY_FIELDS = ("dp.noise_multiplier", "dp.target_epsilon", "dp.max_epsilon")
RECIPES = importlib.resources.files("dpvision") / "recipes"  # package data: default_<dataset>.yaml


def default_recipe_datasets() -> tuple[str, ...]:
    """The datasets whose ``dpvision train --dataset NAME`` (no ``--config``) starts from a default recipe."""
    names = (item.name for item in RECIPES.iterdir())
    return tuple(sorted(n[len("default_"):-len(".yaml")] for n in names if n.startswith("default_")
                        and n.endswith(".yaml")))


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``dpvision train``'s flags: a recipe, every field of the flag map, ``--set``, ``--resume``."""
    add = parser.add_argument
    add("--config", default=None, metavar="FILE", help="YAML recipe (e.g. recipes/mnist_seed.yaml); flags override "
        "it. dpvision train without it: --dataset " + "/".join(default_recipe_datasets()) + " start from the "
        "dataset's default recipe (dpvision/recipes/default_<dataset>.yaml), any other dataset from the defaults")
    flags = FlagMap()
    flags.add_all(parser)
    parser.set_defaults(flag_map=flags)
    add("--disable-dp", action="store_true", default=None, help="the baseline: the same config without DP "
        "(then the recipe's baseline section, if it has one)")
    add("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set optim.momentum=0.9 (repeatable)")
    resume_free = ", ".join(TRAIN_FLAGS.flag(field) for field in RESUME_FREE_FIELDS)
    add("--resume", default=None, metavar="RUN_DIR",
        help=f"continue the run in RUN_DIR with its saved config (only {resume_free} may be given again)")
    return parser


def train_overrides(args: argparse.Namespace) -> dict:
    """``{"section.field": value}`` from the named flags and ``--set`` (later wins)."""
    overrides = args.flag_map.values(args)
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set needs SECTION.FIELD=VALUE, got {item!r}")
        overrides[key.strip()] = parse_value(text)
    return overrides


def recipe(args: argparse.Namespace, dataset: str | None, *, default_recipe: bool) -> tuple:
    """``(config, baseline, source)``: the recipe's config, its ``baseline`` section (what ``--disable-dp``
    changes besides switching DP off, ``{"section.field": value}``) and its name (None: the defaults).

    Without ``--config``, a dataset with a default recipe starts from it (``default_recipe``: dpvision
    train; a sweep keeps the defaults).
    """
    if args.config:
        source, values = args.config, load_recipe(args.config)  # its errors name the file already
    elif default_recipe and dataset in default_recipe_datasets():
        resource = RECIPES / f"default_{dataset}.yaml"
        with importlib.resources.as_file(resource) as path:
            values = load_recipe(path)
        source = f"dpvision/recipes/{resource.name}"
    else:
        return TrainConfig(), {}, None
    baseline = values.pop("baseline", None) or {}
    if not isinstance(baseline, dict):
        raise ValueError(f"{source}: baseline must map section.field to a value, got {type(baseline).__name__}")
    try:
        return TrainConfig.from_dict(values, source=source), baseline, source
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def train_config(args: argparse.Namespace, given: Sequence[str], *, default_recipe: bool = False):
    """The recipe (if any), overridden by the flags; ``--disable-dp`` deactivates DP (then applies the
    recipe's ``baseline``) before the flags."""
    overrides = train_overrides(args)
    base, baseline, source = recipe(args, overrides.get("data.dataset"), default_recipe=default_recipe)
    if args.disable_dp:
        refused = [TRAIN_FLAGS.flag(f) for f in DP_ONLY_FIELDS if TRAIN_FLAGS.flag(f) in given]
        if refused:
            raise ValueError(f"{refused[0]} needs DP: --disable-dp adds no noise and spends no privacy")
        dp_keys = [k for k in overrides if k in DP_ONLY_FIELDS]
        if dp_keys:
            raise ValueError(f"--set {dp_keys[0]} needs DP: --disable-dp adds no noise and spends no privacy")
        try:
            base = base.deactivated().with_overrides(baseline)
        except ValueError as err:
            raise ValueError(f"{source}: baseline: {err}") from None
    if "dp.target_epsilon" in overrides:  # a target given on the command line replaces the recipe's σ
        overrides.setdefault("dp.noise_multiplier", None)
    elif "dp.noise_multiplier" in overrides:
        overrides.setdefault("dp.target_epsilon", None)
    try:
        return base.with_overrides(overrides)
    except ValueError as err:
        where = f"{source} with the flags" if source else "flags"
        raise ValueError(f"{err} ({where})") from None


def run_train(args: argparse.Namespace, given: Sequence[str]) -> dict:
    if args.resume is not None:
        check_resume_flags(given, ["--resume", *(TRAIN_FLAGS.flag(field) for field in RESUME_FREE_FIELDS)])
        return train_job.run(resume=args.resume, overrides=args.flag_map.values(args, RESUME_FREE_FIELDS))
    return train_job.run(train_config(args, given, default_recipe=True))


# ----------------------------------------------------------------------------- dpvision sweep
def add_sweep_arguments(parser) -> None:
    parser.add_argument("--epsilons", required=True, help="target ε values, comma-separated (e.g. 0.5,1,3)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every point (default: 3)")
    parser.add_argument("--out", required=True, metavar="DIR", help="sweep folder: runs/, results.csv, frontier.png")
    parser.add_argument("--vary", default=None, metavar="SECTION.FIELD=V1,V2",
                        help="also vary one config field over these values")
    parser.add_argument("--no-baseline", action="store_true", help="skip the non-private baseline runs")


def command_line(args, given: Sequence[str]) -> str:
    """The command as typed (flags in their order), rebuilt from the parsed ``args`` (not ``sys.argv``,
    which is another program's when ``dpvision.cli.main(argv)`` is called from Python).

    Example:
        >>> import argparse
        >>> args = argparse.Namespace(epsilons="1,3", seeds=2, out="out dir", set=["optim.lr=0.2"], quiet=True)
        >>> command_line(args, ["--epsilons", "--seeds", "--out", "--set", "--quiet"])
        "dpvision sweep --epsilons 1,3 --seeds 2 --out 'out dir' --set optim.lr=0.2 --quiet"
    """
    parts = ["dpvision", "sweep"]
    for flag in given:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            for item in value:
                parts += [flag, str(item)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def run_sweep(args, given: Sequence[str]) -> list[dict]:
    """``dpvision sweep``: the recipe and train flags of ``args``, over ``--epsilons`` and ``--seeds``."""
    epsilons = parse_list(args.epsilons, "--epsilons")
    if any(not (math.isfinite(e) and e > 0) for e in epsilons):
        raise ValueError(f"--epsilons must be positive numbers, got {args.epsilons!r}")
    if not 1 <= args.seeds <= MAX_RUNS:
        raise ValueError(f"--seeds must be between 1 and {MAX_RUNS}, got {args.seeds}")
    vary = None
    if args.vary:
        key, sep, text = args.vary.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ValueError(f"--vary needs SECTION.FIELD=V1,V2,..., got {args.vary!r}")
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise ValueError(f"--vary: {key} is not a setting (use section.field, e.g. optim.lr)")
        if key in SWEEP_FIELDS:
            raise ValueError(f"--vary: the sweep sets {key} itself (--epsilons, --seeds); vary another field")
        values = [parse_value(v) for v in text.split(",") if v.strip()]
        if not values or len({label(v) for v in values}) != len(values):
            raise ValueError(f"--vary needs distinct values, got {args.vary!r}")
        vary = (key, values)
    base = train_config(args, given)
    command = command_line(args, given)
    return sweep(base, epsilons=epsilons, seeds=list(range(args.seeds)), out=args.out, vary=vary,
                 baseline=not args.no_baseline, command=command)


def build_parser(argv: Sequence[str]) -> OneLineParser:
    """``dpvision`` and its subcommands; each parsed namespace's ``func()`` runs the command (exit status)."""
    def job(parser, depth, fn):  # depth: the command words before the subcommand's own flags
        parser.set_defaults(func=lambda args: run_guarded(parser, lambda: fn(args, given_flags(parser, argv[depth:]))))

    parser = OneLineParser(prog="dpvision", description="Differentially private image classifiers (DP-SGD).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    train = add_train_arguments(sub.add_parser("train", help="train any dataset and model, baseline or DP-SGD"))
    job(train, 1, run_train)
    sweeper = add_train_arguments(sub.add_parser("sweep", help="one recipe over ε values and seeds: the "
                                                 "privacy-utility frontier (results.csv, frontier.png, report.md)"))
    add_sweep_arguments(sweeper)
    job(sweeper, 1, run_sweep)
    mnist = sub.add_parser("mnist", help="train SampleConvNet on MNIST (the same flags as python mnist.py)")
    mnist_seed.add_mnist_arguments(mnist)
    mnist.set_defaults(func=lambda args: mnist_seed.run_parsed(mnist, args, given_flags(mnist, argv[1:])))
    audit = sub.add_parser("audit", help="one-run empirical privacy audit (Steinke, Nasr, Jagielski 2023)")
    add_audit_arguments(audit)
    audit.set_defaults(func=lambda args: run_audit(args, audit))
    celeba = add_celeba_subcommands(sub)  # dpvision celeba make-demo-archive | build-subset | preprocess
    trainer = celeba.subcommands.add_parser("train", help="train the CelebA CNN: baseline or DP-SGD")
    celeba_seed.add_train_arguments(trainer)
    trainer.set_defaults(func=lambda args: celeba_seed.run_parsed(trainer, args, given_flags(trainer, argv[2:])))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``dpvision <subcommand> ...``: parsed once, by argparse, then run."""
    one_line_warnings()
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = build_parser(argv).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

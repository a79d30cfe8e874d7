"""Everything a run decides before its first step: the data, the privacy plan, the model, the engine.

:func:`prepare` is the job's one call here: for a new run or for the run folder a resume names,
it makes every check, then the model and the engine, and returns them as one :class:`Setup`.
Checks come before any file is written: a bad recipe, missing data or an
unreachable ε stops the job with one line and an untouched disk.

* :func:`load_data` loads the dataset, takes the ``--k`` subset and carves the
  validation split, each from its own seeded generator.
* :func:`plan_privacy` makes the run's one :class:`~dpvision.privacy.plan.Plan` from the N
  actually trained on: δ (``auto``), σ (given, default or calibrated to ``target_epsilon``),
  q, steps per epoch, E[B] and the schedule's length.
* :func:`check_can_run` and :func:`validate` run every check that can fail before anything is written
  (the run folder, the device; the data, the model, the plan).
* :func:`build` makes the model and the engine, which trains as the plan says (on this rank's share,
  under torch.distributed); a new run's private input normalisation (``model.input_norm: private``) is
  computed there, once, before the engine exists (:func:`fit_private_input_norm`), and a model's frozen prefix
  once per split, where ``run.cache_features`` allows (:mod:`dpvision.jobs.features`).

Example:
    >>> plan = plan_privacy(TrainConfig(), num_train=30_000)
    >>> plan.noise_multiplier, plan.sample_rate == 1 / 118, plan.steps_per_epoch, plan.delta
    (1.0, True, 118, 1e-05)
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

from dpvision.checkpoint import Checkpointer
from dpvision.cli_support import check_can_create_dir, resolve_device
from dpvision.data import data_fingerprint, load_dataset
from dpvision.data.mnist import random_subset
from dpvision.data.registry import DATASET_REGISTRY
from dpvision.engines import DistContext, Engine, FastOptions, OptimizerSpec, build_engine
from dpvision.engines.contrastive import PROJECTION_DIM
from dpvision.jobs.config import TrainConfig
from dpvision.jobs.features import FeatureStore, cached_data, release
from dpvision.jobs.rundir import restore
from dpvision.models import build_model, check_model_options
from dpvision.models.external import check_external, is_external, resolve_model
from dpvision.models.init import prepare as prepare_model
from dpvision.models.input_norm import fit_input_norm
from dpvision.privacy.accounting import compute_epsilon
from dpvision.privacy.plan import Plan, make_plan
from dpvision.seeding import make_generator, seed_everything

MIN_SENSIBLE_STEPS = 200  # fewer optimizer steps than this rarely train a network from scratch


@dataclass(frozen=True)
class Data:
    """The splits a run uses; ``val`` is the dataset's own or carved from train (``data.val_size``)."""

    train: object  # ImageTensors
    val: object | None
    test: object
    class_names: tuple[str, ...]
    val_groups: tuple[str, ...] | None
    test_groups: tuple[str, ...] | None
    fingerprint: str  # of the training set actually trained on


@dataclass(frozen=True)
class Given:
    """What a caller hands over from Python (:mod:`dpvision.api`) instead of what the config names."""

    data: Data | None = None  # the splits
    model: nn.Module | None = None  # trained in place
    features: FeatureStore | None = None  # cached features kept across runs on the same data (a tuning loop)


@dataclass(frozen=True)
class Setup:
    """A run ready for its first step: the config that runs, its data and plan, the engine (model inside)."""

    config: TrainConfig
    data: Data  # with run.cache_features: the splits' features (dpvision.jobs.features)
    plan: Plan
    engine: Engine


def prepare(config: TrainConfig | None, dist: DistContext, *, resume: str | os.PathLike | None = None,
            overrides: dict | None = None, given: Given = Given()) -> Setup:
    """The :class:`Setup` of a new run (``config``) or of the run folder ``resume`` names (its saved config
    with ``overrides`` of its free keys); every check first, nothing written."""
    if resume is None:
        assert config is not None, "give a config or a run folder to resume"
        planned = config
    else:
        config, saved = dist.broadcast_object(restore(resume, overrides or {}) if dist.is_main else None)
        sigma = float(saved["noise_multiplier"])  # exactly as the run used it (no recalibration)
        planned = (replace(config, dp=replace(config.dp, target_epsilon=None, noise_multiplier=sigma))
                   if config.dp.enabled else config)
    check_can_run(config, dist, new_run=resume is None)
    data, plan = validate(planned, given)
    if resume is None:
        advice = few_steps_advice(config, plan)
        if advice and not config.run.quiet and dist.is_main:
            print(f"warning: {advice}", file=sys.stderr, flush=True)
    elif data.fingerprint != saved.get("data_fingerprint"):
        raise ValueError(f"data.root {config.data.root!r} does not hold the training data the run in "
                         f"{str(resume)!r} was trained on (fingerprint {data.fingerprint[:12]}... vs "
                         f"{str(saved.get('data_fingerprint'))[:12]}...); point it at the original data")
    # A resumed run's normalisation comes with its checkpoint (never computed, nor spent, twice); a folder
    # without one starts afresh, and its seeded statistics are the same numbers again.
    fresh = resume is None or not dist.broadcast_object(
        os.path.exists(os.path.join(resume, Checkpointer.FILE)) if dist.is_main else None)
    engine, data = build(config, data, plan, dist, given=given, fit_norm=fresh)
    return Setup(config=config, data=data, plan=plan, engine=engine)


def check_can_run(config: TrainConfig, dist: DistContext, *, new_run: bool) -> None:
    """Before loading any data (creates nothing): a new run's ``run.runs_dir`` can be written (rank 0 tries,
    every rank gets its verdict), TensorBoard is installed if asked for, the device exists."""
    if new_run:
        problem = None
        if dist.is_main:
            try:
                check_can_create_dir(config.run.runs_dir, "run.runs_dir")
            except ValueError as err:
                problem = str(err)
        if dist.broadcast_object(problem):
            raise ValueError(problem)
    if config.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("run.tensorboard needs the tensorboard package: pip install 'dpvision[tensorboard]'")
    resolve_device(config.run.device)  # refuses cuda where there is none (one line, not a traceback)


def load_data(config: TrainConfig):
    """The run's :class:`Data`; ``ValueError`` (a ``DataError``) naming the file or setting when it cannot."""
    splits = load_dataset(config.data.dataset, config.data.root, image_size=config.data.image_size,
                          download=config.data.download)
    train, val, val_groups = splits.train, splits.val, splits.val_groups
    seed = config.run.seed
    if config.data.k is not None:
        if config.data.k > len(train):
            raise ValueError(f"data.k must be at most the {len(train)} training examples of "
                             f"{config.data.dataset}, got {config.data.k}")
        train = random_subset(train, config.data.k, make_generator(seed, "subset"))
    if config.data.val_size:
        if val is not None:
            raise ValueError(f"data.val_size: {config.data.dataset} at {config.data.root} has its own validation "
                             "split; set data.val_size to 0")
        if config.data.val_size >= len(train):
            raise ValueError(f"data.val_size must be below the {len(train)} training examples, "
                             f"got {config.data.val_size}")
        order = torch.randperm(len(train), generator=make_generator(seed, "val_split"))
        val, train = train.subset(order[:config.data.val_size]), train.subset(order[config.data.val_size:])
        val_groups = None
    return Data(train=train, val=val, test=splits.test, class_names=tuple(splits.class_names),
                val_groups=val_groups, test_groups=splits.test_groups, fingerprint=data_fingerprint(train))


def plan_privacy(config: TrainConfig, *, num_train: int) -> Plan:
    """The run's :class:`~dpvision.privacy.plan.Plan` for ``num_train`` examples: δ, σ (given, default or
    calibrated; accountable within bounded work), q, the epoch length and the schedule's; ``ValueError``
    naming the setting when impossible."""
    optim = config.optim
    if optim.batch_size > num_train:
        raise ValueError(f"optim.batch_size must be at most the {num_train} training examples, "
                         f"got {optim.batch_size}")
    return make_plan(config.dp, num_train=num_train, batch_size=optim.batch_size, epochs=optim.epochs,
                     warmup_epochs=optim.warmup_epochs, check_work=True,
                     private_input_norm=config.model.input_norm == "private")


def outputs(config: TrainConfig, data: Data) -> int:
    """The model's outputs: the classes, or the contrastive objective's projection."""
    return PROJECTION_DIM if config.optim.objective == "contrastive" else len(data.class_names)


def validate(config: TrainConfig, given: Given = Given()) -> tuple[Data, Plan]:
    """The data, the model's options and the plan, checked (nothing written); returns ``(data, plan)``.

    ``given``: the splits and the module handed over from Python (:mod:`dpvision.api`) instead of those
    ``config`` names.
    """
    data = load_data(config) if given.data is None else given.data
    image_size = int(data.train.images.shape[-1])
    if config.model.input_norm != "group" and (given.model is not None or is_external(config.model.name)):
        raise ValueError(f"model.input_norm {config.model.input_norm} needs a ScatterNet model of the registry "
                         "(scatternet_cnn or scatternet_linear)")
    if given.model is None and is_external(config.model.name):  # torchvision:<name> or <module>:<factory>
        check_external(config.model.name, image_size=image_size)
    elif given.model is None:  # (the caller's own module was checked by dpvision.api)
        check_model_options(config.model.name, in_channels=int(data.train.images.shape[1]),
                            num_classes=outputs(config, data), image_size=image_size,
                            activation=config.model.activation, width=config.model.width,
                            weight_standardization=config.model.weight_standardization,
                            input_norm=config.model.input_norm)
    return data, plan_privacy(config, num_train=len(data.train))


def few_steps_advice(config: TrainConfig, plan: Plan) -> str | None:
    """A sentence when the run takes too few optimizer steps to learn, with settings that give enough.

    Without DP the batch size is halved (down to 32) until the epochs give enough steps, then the epochs are
    raised to reach ``MIN_SENSIBLE_STEPS``: on the 630-image CelebA demo subset the default run (DP, batch 256,
    10 epochs: 30 steps) ends at chance (0.54) and, without DP, the advised batch 32 for 10 epochs (200 steps)
    reaches 0.84 test accuracy (CPU, the celeba recipe's lr 0.05 for the baseline).
    Under DP the batch is kept and only the epochs rise: each step adds noise of std σC/B per coordinate to
    the mean gradient, so a smaller batch buys steps with noisier ones (the old advice, batch 32, stays at
    chance there). More steps cost privacy: the advice states the ε they spend (σ fixed), or that σ is
    recalibrated to the target (``dp.target_epsilon``), which makes every step noisier. On so few examples
    DP-SGD may not learn at a useful ε at all (batch 256 at lr 0.02: 0.53 after 102 steps there): it says so.

    Example:
        >>> from dpvision.jobs.config import OptimConfig
        >>> cfg = TrainConfig(optim=OptimConfig(batch_size=256, epochs=10))
        >>> print(few_steps_advice(cfg.deactivated(), plan_privacy(cfg.deactivated(), num_train=630)))
        only 30 optimizer steps (10 epochs of 3 steps, batch size 256 for 630 examples): too few to learn; try --batch-size 32 --epochs 10 (200 steps)
        >>> print(few_steps_advice(cfg, plan_privacy(cfg, num_train=630)))
        only 30 optimizer steps (10 epochs of 3 steps, batch size 256 for 630 examples): too few to learn; try --batch-size 256 --epochs 67 (201 steps; under DP a smaller batch makes every step noisier; ε = 42.1 at δ = 1e-05 with σ = 1; with 630 examples DP-SGD may not learn at a useful ε: more data helps most)
    """
    optim = config.optim
    if plan.total_steps >= MIN_SENSIBLE_STEPS:
        return None
    n, batch = plan.num_train, optim.batch_size
    halve = not plan.dp and optim.objective != "contrastive"  # contrastive: the batch is its negatives, keep it
    while halve and batch > 32 and math.ceil(n / batch) * optim.epochs < MIN_SENSIBLE_STEPS:
        batch //= 2
    per_epoch = replace(plan, batch_size=batch).steps_per_epoch
    advised = replace(plan, batch_size=batch, epochs=max(optim.epochs, math.ceil(MIN_SENSIBLE_STEPS / per_epoch)))
    why = ""
    if plan.dp:
        why = "; under DP a smaller batch makes every step noisier"
        if config.dp.target_epsilon is not None:
            why += f"; σ is recalibrated to end at ε = {config.dp.target_epsilon:g}, so each step gets noisier too"
        else:
            epsilon = compute_epsilon(advised.history(), delta=plan.delta, accountant=plan.accountant)
            why += f"; ε = {epsilon:.3g} at δ = {plan.delta:.2g} with σ = {plan.noise_multiplier:g}"
        why += f"; with {n} examples DP-SGD may not learn at a useful ε: more data helps most"
    return (f"only {plan.total_steps} optimizer steps ({optim.epochs} epochs of {plan.steps_per_epoch} steps, batch "
            f"size {optim.batch_size} for {n} examples): too few to learn; try --batch-size {batch} "
            f"--epochs {advised.epochs} ({advised.total_steps} steps{why})")


def fit_private_input_norm(model: nn.Module, config: TrainConfig, train, plan: Plan, dist: DistContext) -> None:
    """Set ``model.norm`` to the training set's channel statistics: released under DP as ``plan.releases``
    (σ_norm, clipping bound ``dp.input_norm_bound``, noise from the run's seeded "input_norm" generator),
    exact without DP. Rank 0 computes them (the noise is drawn once) and every rank receives them."""
    stats = None
    if dist.is_main:
        sigma = plan.releases[0][0] if plan.releases else None
        stats = fit_input_norm(model, train, batch_size=config.optim.eval_batch_size, device=dist.device,
                               noise_multiplier=sigma, bound=config.dp.input_norm_settings()[1],
                               generator=make_generator(config.run.seed, "input_norm"))
    mean, var = dist.broadcast_object(stats)
    model.norm.set_statistics(mean, var)


def build(config: TrainConfig, data: Data, plan: Plan, dist: DistContext, given: Given = Given(),
          fit_norm: bool = True) -> tuple[Engine, Data]:
    """The model (seeded initialisation; ``given.model``: the caller's own, :mod:`dpvision.api`) and the engine
    that trains it (on this rank's share, under ``dist``), with the data it trains and is judged on: ``data``,
    or its features where ``run.cache_features`` allows (computed into ``given.features`` when given).
    ``fit_norm``: compute a private input normalisation's statistics now (False: a resumed run's checkpoint
    brings them)."""
    seed_everything(config.run.seed)  # weight initialisation draws from torch's global generator
    model = given.model
    train = data.train
    sizes = dict(in_channels=int(train.images.shape[1]), num_classes=outputs(config, data),
                 image_size=int(train.images.shape[-1]))
    if model is None:
        model = resolve_model(config.model.name, **sizes)  # torchvision:<name> or <module>:<factory>; else None
    if model is None:
        model = build_model(config.model.name, **sizes, activation=config.model.activation, width=config.model.width,
                            weight_standardization=config.model.weight_standardization,
                            input_norm=config.model.input_norm)
    if config.model.init is not None or config.model.finetune != "all":
        example = train.normalize(train.images[:1])  # [1, C, H, W]: finds the classifier head
        prepare_model(model, example, init=config.model.init, init_head=config.model.init_head,
                      finetune=config.model.finetune)
    data = cached_data(config, data, model, dist.device, store=given.features,
                       quiet=config.run.quiet or not dist.is_main)
    train = data.train  # images, or their cached features (model.takes_features)
    if config.model.input_norm == "private" and fit_norm:  # after model.init: these statistics are the run's
        fit_private_input_norm(model, config, train, plan, dist)
    optim = config.optim
    optimizer = OptimizerSpec(name=optim.name, lr=optim.lr, momentum=optim.momentum if optim.name == "sgd" else 0.0,
                              schedule=optim.schedule)
    if optim.augmult and config.run.engine != "fast":
        raise ValueError("optim.augmult needs the fast engine (run.engine: fast)")
    options = None  # the opacus engine takes none (config: run.precision is auto there)
    if config.run.engine == "fast":
        options = FastOptions(precision=None if config.run.precision == "auto" else config.run.precision,
                              augmult=optim.augmult, objective=optim.objective, temperature=optim.temperature,
                              augment_flip=(bool(optim.augmult) or optim.objective == "contrastive")
                              and DATASET_REGISTRY[config.data.dataset].allows_flip)
    # One process: the engine's own world of one on this device; data-parallel: this rank's context.
    device = dist if dist.is_distributed else dist.device
    try:
        engine = build_engine(config.run.engine, model=model, train_data=train, plan=plan, optimizer=optimizer,
                              seed=config.run.seed, device=device, options=options)
    except BaseException:
        release(model)  # a caller's module takes images again
        raise
    return engine, data

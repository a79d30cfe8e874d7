"""Everything a run decides before its first step: the data, the privacy plan, the model.

Checks come before any file is written: a bad recipe, missing data or an
unreachable ε stops the job with one line and an untouched disk.

* :func:`load_data` loads the dataset, takes the ``--k`` subset and carves the
  validation split, each from its own seeded generator.
* :func:`plan_privacy` resolves δ (``auto``), σ (given, default or calibrated to
  ``target_epsilon``) and the Poisson sample rate q from the N actually trained on.
* :func:`build` makes the model and the engine (DP is the single ``dp=`` argument).

Example:
    >>> plan = plan_privacy(TrainConfig(), num_train=30_000)
    >>> plan.noise_multiplier, plan.sample_rate == 1 / 118, plan.steps_per_epoch, plan.delta
    (1.0, True, 118, 1e-05)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from dpvision.jobs.config import TrainConfig

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
class PrivacyPlan:
    """What the accountant needs, derived from the data actually trained on."""

    dp: bool
    noise_multiplier: float  # σ (0.0 without DP)
    max_grad_norm: float  # C (inf without DP)
    delta: float
    sample_rate: float  # q = 1 / ceil(N / B)
    steps_per_epoch: int
    num_train: int


def load_data(config: TrainConfig):
    """The run's :class:`Data`; ``ValueError`` (a ``DataError``) naming the file or setting when it cannot."""
    from dpvision.data import data_fingerprint, load_dataset
    from dpvision.data.mnist import random_subset
    from dpvision.seeding import make_generator

    if config.data.dataset == "python":
        raise ValueError("data.dataset python is data handed over from Python: pass it to dpvision.fit(...)")
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
        import torch

        order = torch.randperm(len(train), generator=make_generator(seed, "val_split"))
        val, train = train.subset(order[:config.data.val_size]), train.subset(order[config.data.val_size:])
        val_groups = None
    return Data(train=train, val=val, test=splits.test, class_names=tuple(splits.class_names),
                val_groups=val_groups, test_groups=splits.test_groups, fingerprint=data_fingerprint(train))


def plan_privacy(config: TrainConfig, *, num_train: int) -> PrivacyPlan:
    """σ, δ and q for ``num_train`` examples; ``ValueError`` naming the setting when impossible."""
    from dpvision.privacy.accounting import (
        calibrate_noise_multiplier, poisson_sample_rate, resolve_delta, steps_per_epoch,
    )  # fmt: skip
    from dpvision.privacy.bounds import check_noise_multiplier

    dp, optim = config.dp, config.optim
    if optim.batch_size > num_train:
        raise ValueError(f"optim.batch_size must be at most the {num_train} training examples, "
                         f"got {optim.batch_size}")
    q = poisson_sample_rate(num_train, optim.batch_size)
    per_epoch = steps_per_epoch(q)
    delta = resolve_delta(dp.delta, num_train)
    if not dp.enabled:
        return PrivacyPlan(dp=False, noise_multiplier=0.0, max_grad_norm=math.inf, delta=delta, sample_rate=q,
                           steps_per_epoch=per_epoch, num_train=num_train)
    if dp.target_epsilon is not None:
        try:
            sigma = calibrate_noise_multiplier(target_epsilon=dp.target_epsilon, delta=delta, sample_rate=q,
                                               steps=optim.epochs * per_epoch, accountant=dp.accountant)
        except ValueError as err:
            raise ValueError(f"dp.target_epsilon: {err}") from None
    else:
        sigma = dp.DEFAULT_NOISE_MULTIPLIER if dp.noise_multiplier is None else float(dp.noise_multiplier)
    # Bounded accountant work: σ in range, and PRV/PLD (as the primary) only where their grids are bounded.
    check_noise_multiplier(sigma, "dp.noise_multiplier", accountant=dp.accountant, sample_rate=q,
                           steps=optim.epochs * per_epoch, delta=delta, accountant_flag="dp.accountant")
    if delta >= 1 / num_train:
        warnings.warn(f"delta {delta:g} is at least 1/N = 1/{num_train}: too large to be a meaningful privacy "
                      "guarantee (use delta << 1/N, e.g. 'auto')", stacklevel=2)
    return PrivacyPlan(dp=True, noise_multiplier=sigma, max_grad_norm=float(dp.max_grad_norm), delta=delta,
                       sample_rate=q, steps_per_epoch=per_epoch, num_train=num_train)


def few_steps_advice(config: TrainConfig, plan: PrivacyPlan) -> str | None:
    """A sentence when the run takes too few optimizer steps to learn, with settings that would not.

    Example:
        >>> from dpvision.jobs.config import OptimConfig
        >>> cfg = TrainConfig(optim=OptimConfig(batch_size=256, epochs=10))
        >>> plan = plan_privacy(cfg, num_train=482)
        >>> print(few_steps_advice(cfg, plan))
        only 20 optimizer steps (10 epochs of 2 steps, batch size 256 for 482 examples): too few to learn; try --batch-size 32 --epochs 13 (208 steps)
    """
    total = config.optim.epochs * plan.steps_per_epoch
    if total >= MIN_SENSIBLE_STEPS:
        return None
    n = plan.num_train
    batch = config.optim.batch_size
    while batch > 32 and math.ceil(n / batch) * config.optim.epochs < MIN_SENSIBLE_STEPS:
        batch //= 2
    per_epoch = math.ceil(n / batch)
    epochs = max(config.optim.epochs, math.ceil(MIN_SENSIBLE_STEPS / per_epoch))
    return (f"only {total} optimizer steps ({config.optim.epochs} epochs of {plan.steps_per_epoch} steps, batch "
            f"size {config.optim.batch_size} for {n} examples): too few to learn; try --batch-size {batch} "
            f"--epochs {epochs} ({epochs * per_epoch} steps)")


def build(config: TrainConfig, data: Data, plan: PrivacyPlan, device, dist=None, model=None):
    """The model (seeded initialisation; ``model``: the caller's own, :mod:`dpvision.api`) and the engine that
    trains it (on this rank's share, under ``dist``)."""
    from dpvision.engines import DPSettings, OptimizerSpec, build_engine
    from dpvision.models import build_model
    from dpvision.models.external import resolve_model

    train = data.train
    sizes = dict(in_channels=int(train.images.shape[1]), num_classes=len(data.class_names),
                 image_size=int(train.images.shape[-1]))
    if model is None:
        model = resolve_model(config.model.name, **sizes)  # torchvision:<name> or <module>:<factory>; else None
    if model is None:
        model = build_model(config.model.name, **sizes, activation=config.model.activation, width=config.model.width,
                            weight_standardization=config.model.weight_standardization)
    dp = (DPSettings(noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm) if plan.dp
          else None)
    optim = config.optim
    optimizer = OptimizerSpec(name=optim.name, lr=optim.lr, momentum=optim.momentum if optim.name == "sgd" else 0.0,
                              schedule=optim.schedule, warmup_steps=round(optim.warmup_epochs * plan.steps_per_epoch),
                              total_steps=optim.epochs * plan.steps_per_epoch)
    extra = {"dist": dist} if dist is not None and dist.is_distributed else {}
    if config.run.precision != "auto":
        extra["precision"] = config.run.precision
    if optim.augmult:  # digits must not be mirrored; clothes, objects and faces may
        extra.update(augmult=optim.augmult, augment_flip=config.data.dataset != "mnist")
    return build_engine(config.run.engine, model=model, train_data=train, batch_size=optim.batch_size,
                        optimizer=optimizer, dp=dp, seed=config.run.seed, device=device, **extra)

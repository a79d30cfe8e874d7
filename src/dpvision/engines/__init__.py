"""Training engines: the stock Opacus engine and dpvision's fast engine, behind one interface.

``build_engine(name, ...)`` is the one way to make an engine; :mod:`dpvision.engines.base`
defines what an engine is and keeps the registry (``ENGINE_REGISTRY``) the name is looked up in.

Example:
    >>> plan = make_plan(DPSettings(noise_multiplier=1.3, max_grad_norm=1.0),         # doctest: +SKIP
    ...                  num_train=len(data), batch_size=256, epochs=1)
    >>> engine = build_engine("opacus", model=SampleConvNet(), train_data=data, plan=plan,   # doctest: +SKIP
    ...                       optimizer=OptimizerSpec(lr=0.15), seed=0, device="cpu")
    >>> result = engine.train_epoch()                                                    # doctest: +SKIP
"""

from __future__ import annotations

import sys

from torch import nn

from dpvision.data.tensors import ImageTensors
from dpvision.engines.base import (
    ENGINE_REGISTRY, OPTIMIZERS, Device, Engine, EpochResult, OptimizerSpec, ProgressFn, UnsupportedModelError, evaluate,
)  # fmt: skip
from dpvision.engines.clipping import CLIPPING_RULES
from dpvision.engines.distributed import DistContext
from dpvision.engines.fast import FastEngine
from dpvision.engines.instrument import Instrument
from dpvision.engines.opacus_engine import OpacusEngine
from dpvision.engines.options import FastOptions
from dpvision.privacy.plan import Plan

ENGINES = tuple(ENGINE_REGISTRY)  # ("fast", "opacus")

__all__ = [
    "CLIPPING_RULES", "ENGINES", "ENGINE_REGISTRY", "OPTIMIZERS", "Device", "DistContext", "Engine", "EpochResult", "FastEngine",
    "FastOptions", "Instrument", "OpacusEngine", "OptimizerSpec", "ProgressFn", "UnsupportedModelError",
    "build_engine", "evaluate",
]  # fmt: skip


def build_engine(name: str, *, model: nn.Module, train_data: ImageTensors, plan: Plan, optimizer: OptimizerSpec,
                 seed: int, device: Device = "cpu", options: FastOptions | None = None) -> Engine:
    """The engine called ``name`` (a key of ``ENGINE_REGISTRY``), trained as ``plan`` says.

    ``device``: a device (one process), or this rank's :class:`DistContext` (data-parallel, on its device).
    An engine that does not support the model (``UnsupportedModelError``) hands over to its
    ``fallback`` engine (the fast engine's is ``"opacus"``) with a notice on stderr, given only the
    common arguments: its speed options are dropped; a run whose mathematics only it has
    (augmentation multiplicity, a clipping rule other than ``flat``) stops instead. An audit's
    instrument plugs into :class:`FastEngine` itself, which never falls back.
    """
    if name not in ENGINE_REGISTRY:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_REGISTRY)}, got {name!r}")
    engine_class = ENGINE_REGISTRY[name]
    common = dict(model=model, train_data=train_data, plan=plan, optimizer=optimizer, seed=seed, device=device)
    try:
        return engine_class(**common, options=options)
    except UnsupportedModelError as err:
        own_math = (options is not None and (options.augmult or options.objective != "cross_entropy")
                    or plan.clipping != "flat")
        if engine_class.fallback is None or own_math:
            raise
        fallback_notice(name, engine_class.fallback, err)
        return ENGINE_REGISTRY[engine_class.fallback](**common)


def fallback_notice(name: str, fallback: str, err: Exception) -> None:
    print(f"notice: the {name} engine does not support this model ({err}); using the {fallback} engine",
          file=sys.stderr)

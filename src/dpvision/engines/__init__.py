"""Training engines: the stock Opacus engine and dpvision's fast engine, behind one interface.

``build_engine(name, ...)`` is the one way to make an engine; :mod:`dpvision.engines.base`
defines what an engine is.

Example:
    >>> engine = build_engine("opacus", model=SampleConvNet(), train_data=data,   # doctest: +SKIP
    ...                       batch_size=256, optimizer=OptimizerSpec(lr=0.15),
    ...                       dp=DPSettings(noise_multiplier=1.3, max_grad_norm=1.0), seed=0)
    >>> result = engine.train_epoch()                                             # doctest: +SKIP
"""

from __future__ import annotations

from dpvision.engines.base import (
    ENGINES, OPTIMIZERS, DPSettings, Engine, EpochResult, OptimizerSpec, ProgressFn, UnsupportedModelError, evaluate,
)  # fmt: skip
from dpvision.engines.opacus_engine import OpacusEngine

__all__ = [
    "ENGINES", "OPTIMIZERS", "DPSettings", "Engine", "EpochResult", "OpacusEngine", "OptimizerSpec", "ProgressFn",
    "UnsupportedModelError", "build_engine", "evaluate",
]  # fmt: skip


FAST_ONLY_OPTIONS = ("physical_batch_size", "grad_sample_mode", "cuda_graphs", "static_shapes", "augmult",
                     "augment_flip", "precision", "channels_last", "pad_sigmas", "bucket",
                     "cudnn_benchmark", "fuse")  # dropped on fallback
AUDIT_OPTIONS = ("canary_gradients", "noise_scale_for_testing")  # fast engine only, never dropped


def build_engine(name: str, **kwargs) -> Engine:
    """The engine called ``name`` (``"fast"`` or ``"opacus"``); keyword arguments as for ``OpacusEngine``.

    ``"fast"`` falls back to the stock Opacus engine, with a notice on stderr, when
    it does not support the model (its own speed options are then ignored).
    """
    if name == "opacus":
        if kwargs.get("augmult"):
            raise ValueError("optim.augmult needs the fast engine (run.engine: fast)")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("augmult", "augment_flip")}
        return OpacusEngine(**kwargs)
    if name == "fast":
        from dpvision.engines.fast import FastEngine, fallback_notice  # noqa: PLC0415

        try:
            return FastEngine(**kwargs)
        except UnsupportedModelError as err:
            if any(kwargs.get(k) not in (None, 1.0) for k in AUDIT_OPTIONS) or kwargs.get("augmult"):
                raise
            fallback_notice(err)
            return OpacusEngine(**{k: v for k, v in kwargs.items() if k not in FAST_ONLY_OPTIONS + AUDIT_OPTIONS})
    raise ValueError(f"engine (--engine) must be one of {ENGINES}, got {name!r}")



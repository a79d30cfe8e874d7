"""Short ways to build engines in tests: a plan from (data, B, σ and C), then the engine with that plan."""

from __future__ import annotations

from dataclasses import dataclass

from dpvision.engines import FastEngine, FastOptions, OpacusEngine
from dpvision.privacy.plan import Plan, make_plan


@dataclass(frozen=True)
class DP:
    """σ and C of a test's DP plan."""

    noise_multiplier: float
    max_grad_norm: float


def plan_for(data, batch_size: int, dp: DP | None, *, epochs: int = 1, clipping: str = "flat") -> Plan:
    """The plan of ``data`` (or its size) with batch size B, DP with ``dp``'s σ and C, or without DP."""
    n = data if isinstance(data, int) else len(data)
    if dp is None:
        return make_plan(num_train=n, batch_size=batch_size, epochs=epochs, dp=False)
    return make_plan(num_train=n, batch_size=batch_size, epochs=epochs, noise_multiplier=dp.noise_multiplier,
                     max_grad_norm=dp.max_grad_norm, clipping=clipping)


def fast_engine(*, model, train_data, batch_size: int, optimizer, dp: DP | None, seed: int, device="cpu",
                dist=None, instrument=None, clipping: str = "flat", **options) -> FastEngine:
    """A :class:`FastEngine` for ``train_data`` with batch size B and ``dp`` (``options``: FastOptions fields)."""
    return FastEngine(model=model, train_data=train_data, plan=plan_for(train_data, batch_size, dp, clipping=clipping),
                      optimizer=optimizer, seed=seed, device=device, dist=dist, options=FastOptions(**options),
                      instrument=instrument)


def opacus_engine(*, model, train_data, batch_size: int, optimizer, dp: DP | None, seed: int, device="cpu",
                  dist=None) -> OpacusEngine:
    """An :class:`OpacusEngine` for ``train_data`` with batch size B and ``dp``."""
    return OpacusEngine(model=model, train_data=train_data, plan=plan_for(train_data, batch_size, dp),
                        optimizer=optimizer, seed=seed, device=device, dist=dist)

"""Short ways to build engines in tests: a plan from (data, B, σ and C), then the engine with that plan."""

from __future__ import annotations

from dataclasses import dataclass

from dpvision.engines import FastEngine, FastOptions, OpacusEngine
from dpvision.privacy.plan import DPSettings, Plan, make_plan


@dataclass(frozen=True)
class DP:
    """σ and C of a test's DP plan."""

    noise_multiplier: float
    max_grad_norm: float


def plan_for(data, batch_size: int, dp: DP | None, *, epochs: int = 1, clipping: str = "flat") -> Plan:
    """The plan of ``data`` (or its size) with batch size B, DP with ``dp``'s σ and C, or without DP."""
    n = data if isinstance(data, int) else len(data)
    if dp is None:
        return make_plan(DPSettings(enabled=False), num_train=n, batch_size=batch_size, epochs=epochs)
    settings = DPSettings(noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm, clipping=clipping)
    return make_plan(settings, num_train=n, batch_size=batch_size, epochs=epochs)


def fast_engine(*, model, train_data, batch_size: int, optimizer, dp: DP | None, seed: int, device="cpu",
                instrument=None, clipping: str = "flat", **options) -> FastEngine:
    """A :class:`FastEngine` for ``train_data`` with batch size B and ``dp`` (``options``: FastOptions fields);
    ``device``: a device, or this rank's DistContext."""
    return FastEngine(model=model, train_data=train_data, plan=plan_for(train_data, batch_size, dp, clipping=clipping),
                      optimizer=optimizer, seed=seed, device=device, options=FastOptions(**options),
                      instrument=instrument)


def opacus_engine(*, model, train_data, batch_size: int, optimizer, dp: DP | None, seed: int,
                  device="cpu") -> OpacusEngine:
    """An :class:`OpacusEngine` for ``train_data`` with batch size B and ``dp`` (``device``: a device, or this
    rank's DistContext)."""
    return OpacusEngine(model=model, train_data=train_data, plan=plan_for(train_data, batch_size, dp),
                        optimizer=optimizer, seed=seed, device=device)

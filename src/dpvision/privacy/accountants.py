"""The accountant registry: every accountant a run can name, registered once with its properties.

An accountant turns a ledger history ``((σ, q, steps), ...)`` (σ > 0, q in (0, 1]) and a δ into
ε for Poisson-sampled Gaussian DP-SGD. Each entry says what the rest of the code asks about it:

* ``rigorous``: ε is a proven upper bound. Only rigorous accountants may be the default, and only
  they have a column in every ``metrics.csv`` row (``epsilon_<name>``, :data:`ACCOUNTANTS`);
* ``max_grid_points``: its bound on work (PRV and PLD discretise the privacy loss on a grid
  whose size :mod:`dpvision.privacy.bounds` predicts before any allocation); ``None`` when the
  cost does not grow with the steps (RDP);
* ``caveat``: what a user must know before choosing it.

Adding an accountant is one function here::

    @register_accountant("name", rigorous=True)
    def _name_epsilon(history, delta): ...

Example:
    >>> ACCOUNTANTS
    ('rdp', 'prv', 'pld')
    >>> ACCOUNTANT_REGISTRY["prv"].max_grid_points, ACCOUNTANT_REGISTRY["rdp"].max_grid_points
    (4000000, None)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np

History = tuple[tuple[float, float, int], ...]

PRV_EPS_ERROR = 0.01  # Opacus's default, passed explicitly: the grid prediction depends on it
PRV_DELTA_ERROR_FACTOR = 1e-3  # Opacus's default delta_error = δ / 1000
PLD_DISCRETIZATION = 1e-4  # dp_accounting's default value_discretization_interval


@dataclass(frozen=True)
class Accountant:
    """One registered accountant: ``epsilon(history, delta) -> ε`` and what the code asks about it."""

    name: str
    epsilon: Callable[[History, float], float]
    rigorous: bool = True  # a proven upper bound: may be the default, has a metrics.csv column
    max_grid_points: int | None = None  # bounded memory (grid accountants); None: work independent of the steps
    caveat: str = ""


ACCOUNTANT_REGISTRY: dict[str, Accountant] = {}


def register_accountant(name: str, *, rigorous: bool = True, max_grid_points: int | None = None,
                        caveat: str = "") -> Callable:
    """Decorator: register ``fn(history, delta) -> ε`` as accountant ``name`` (each name once)."""

    def register(fn: Callable[[History, float], float]) -> Callable[[History, float], float]:
        if name in ACCOUNTANT_REGISTRY:
            raise ValueError(f"accountant {name!r} is registered twice")
        ACCOUNTANT_REGISTRY[name] = Accountant(name, fn, rigorous, max_grid_points, caveat)
        return fn

    return register


def _opacus_epsilon(mechanism: str, history: History, delta: float, **options) -> float:
    from opacus.accountants import create_accountant  # lazy: seconds to import, and config/--help need none of it

    acc = create_accountant(mechanism=mechanism)
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")  # RDP at large σ: still a valid bound
        return float(acc.get_epsilon(delta=delta, **options))


@register_accountant("rdp")
def _rdp_epsilon(history: History, delta: float) -> float:
    """Opacus's RDP accountant (Mironov et al.): always computed, its cost does not grow with the steps."""
    return _opacus_epsilon("rdp", history, delta)


@register_accountant("prv", max_grid_points=4_000_000)
def _prv_epsilon(history: History, delta: float) -> float:
    """Opacus's PRV accountant (Gopi et al. 2021) with the error settings bounds.grid_points predicts from."""
    # q = 1: Opacus's PRV takes log(1 - q) = -inf, which its comparisons handle; only numpy's
    # "divide by zero" warning is silenced, for this call alone.
    with np.errstate(divide="ignore"):
        return _opacus_epsilon("prv", history, delta, eps_error=PRV_EPS_ERROR,
                               delta_error=delta * PRV_DELTA_ERROR_FACTOR)


@register_accountant("pld", max_grid_points=10_000_000)
def _pld_epsilon(history: History, delta: float) -> float:
    """Google's dp_accounting PLD accountant (connect-the-dots, discretisation ``PLD_DISCRETIZATION``)."""
    from dp_accounting import dp_event, pld  # lazy: seconds to import, only needed when ε is computed

    acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for sigma, q, steps in history:
        event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
        acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


@register_accountant("gdp", rigorous=False, caveat=(
    "Gaussian DP (Dong, Roth, Su; Bu et al. 2020) approximates the composition by the central limit theorem: "
    "not an upper bound, it can underestimate ε (arXiv:2106.02848), most with few steps or a large sample rate"))
def _gdp_epsilon(history: History, delta: float) -> float:
    """Opacus's GaussianAccountant (Poisson): an approximation, never the default nor a metrics.csv column."""
    from opacus.accountants import GaussianAccountant  # lazy: seconds to import, only needed when ε is computed

    if len({(sigma, q) for sigma, q, _ in history}) > 1:
        raise ValueError("gdp needs one noise multiplier and sample rate for the whole run")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GDP accounting is experimental")  # the caveat above says it
        acc = GaussianAccountant()
    acc.history = [(history[0][0], history[0][1], sum(steps for _, _, steps in history))]
    return float(acc.get_epsilon(delta=delta, poisson=True))


ACCOUNTANTS = tuple(name for name, spec in ACCOUNTANT_REGISTRY.items() if spec.rigorous)

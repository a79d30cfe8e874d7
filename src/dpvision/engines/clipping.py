"""Per-example clipping rules: how each example's gradient is scaled before the sum is noised.

A rule maps the per-example gradient norms ``norms`` [B] and the clipping norm C to factors [B]
such that every scaled gradient ``factor_i * g_i`` has norm <= C. That bound is the sensitivity
of the clipped sum, so the noise σC and the accountant are the same for every rule: a rule
changes the signal, never the privacy.

* ``flat``: Opacus's ``DPOptimizer``, min(1, C / (norm + 1e-6)): gradients longer than C are
  scaled down to C, shorter ones are left as they are.
* ``automatic``: Bu et al. 2023 ("Automatic clipping: differentially private deep learning made
  easier and stronger"), C / (norm + γ) with γ = 0.01: every gradient is normalised to just under
  C (norm C · norm / (norm + γ) < C), so C only scales the update and needs no tuning.

Adding a rule is one class here with ``@register_clipping("name")``; the config's ``dp.clipping``
and the fast engine read the valid names from ``CLIPPING_RULES``.

Example:
    >>> norms = torch.tensor([0.5, 1.0, 4.0])
    >>> CLIPPING_RULES["flat"].factors(norms, 1.0)
    tensor([1.0000, 1.0000, 0.2500])
    >>> [round(x, 4) for x in (CLIPPING_RULES["automatic"].factors(norms, 1.0) * norms).tolist()]  # all under C
    [0.9804, 0.9901, 0.9975]
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

CLIPPING_RULES: dict[str, "ClippingRule"] = {}
ClipFn = Callable[[torch.Tensor], torch.Tensor]  # a rule at the run's C: per-example norms [B] -> factors [B]


class ClippingRule(Protocol):
    name: str

    def factors(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        """Per-example factors [B] from per-example gradient norms [B]; factor_i * norm_i <= C."""


def register_clipping(name: str) -> Callable[[type], type]:
    """Class decorator: an instance of the class becomes ``CLIPPING_RULES[name]``."""

    def register(cls: type) -> type:
        if name in CLIPPING_RULES:
            raise ValueError(f"clipping rule {name!r} registered twice")
        cls.name = name
        CLIPPING_RULES[name] = cls()
        return cls

    return register


def get_clipping(name: str) -> ClippingRule:
    """The rule called ``name``; ``ValueError`` naming the valid ones otherwise."""
    if name not in CLIPPING_RULES:
        raise ValueError(f"clipping must be one of {', '.join(CLIPPING_RULES)}, got {name!r}")
    return CLIPPING_RULES[name]


@register_clipping("flat")
class FlatClipping:
    """min(1, C / (norm + 1e-6)), exactly Opacus's ``DPOptimizer`` (so the engines agree to the bit)."""

    EPS = 1e-6

    def factors(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        return (max_grad_norm / (norms + self.EPS)).clamp(max=1.0)


@register_clipping("automatic")
class AutomaticClipping:
    """C / (norm + γ), γ = 0.01 (Bu et al. 2023): every example's gradient normalised to norm < C."""

    GAMMA = 0.01  # the paper's stability constant: keeps tiny gradients from being blown up to norm C

    def factors(self, norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
        return max_grad_norm / (norms + self.GAMMA)

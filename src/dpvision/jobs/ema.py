"""An exponential moving average of the weights: post-processing, so free in privacy.

Every DP-SGD iterate is already private; averaging them spends nothing more (De et al.
2022 evaluate the EMA of the weights). The average is updated after every optimizer step
through a step post-hook on the torch optimizer (the same under the fast engine and
under Opacus's ``DPOptimizer``), with the usual warm-up of the decay,
``min(decay, (1 + t) / (10 + t))``, so early averages are not dominated by the random
initialisation. Evaluation, ``model.pt`` and the test set see the averaged weights.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(1, 1, bias=False)
    >>> ema = WeightAverage(model, decay=0.5)
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(1.0)
    >>> ema.update(); ema.steps
    1
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class WeightAverage:
    """EMA of ``model``'s floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"optim.ema_decay must be in (0, 1), got {decay!r}")
        self.model, self.decay, self.steps = model, decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Update after every ``optimizer.step()``."""
        optimizer.register_step_post_hook(lambda *_: self.update())

    @torch.no_grad()
    def update(self) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        current = self.model.state_dict()
        for key, average in self.shadow.items():
            average.lerp_(current[key].detach(), 1.0 - decay)  # average += (1 - decay) (current - average)

    @contextlib.contextmanager
    def applied(self):
        """The model holds the averaged weights inside the block, its own ones again after it."""
        saved = {k: v.detach().clone() for k, v in self.model.state_dict().items() if k in self.shadow}
        self.model.load_state_dict(self.shadow, strict=False)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(saved, strict=False)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)

"""Audit instrumentation: a plug-in the fast engine calls at fixed points of a DP step.

An audit (:mod:`dpvision.audit`) passes an object of this shape as ``instrument=`` to the fast
engine (single process only). The engine has no audit-only branches besides these calls:

* ``canary_gradients()`` (read once, at construction): [m, P] RAW per-example gradient rows,
  P = the number of trainable parameters flattened in ``model.parameters()`` order, or None.
  Each row is an extra "example": clipped by the run's rule and C exactly like a real one,
  sampled by the engine's ``sampler`` (the same Poisson stream as the real examples) and,
  when included, added to the clipped sum before the noise.
* ``on_inclusions(included)``: bool [S, m], which canaries each of a block of S steps included.
* ``on_update(step, update)``: [P] the step's noisy gradient after the division by E[B] (exactly
  what the optimizer is handed; the engine's own buffer, overwritten by the next step: copy it to
  keep it); ``step`` counts the engine's DP steps from 0.

The audit's own test harness injects bugs through the engine's swappable parts instead (its
``sampler``, ``clipping`` and ``noise_std``), never through user options.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Instrument(Protocol):
    def canary_gradients(self) -> torch.Tensor | None: ...

    def on_inclusions(self, included: torch.Tensor) -> None: ...

    def on_update(self, step: int, update: torch.Tensor) -> None: ...


def canary_rows(instrument: Instrument | None, num_params: int, device: torch.device) -> torch.Tensor | None:
    """The instrument's canary rows as float32 [m, P] on ``device`` (None without any); checks the shape."""
    rows = instrument.canary_gradients() if instrument is not None else None
    if rows is None:
        return None
    rows = torch.as_tensor(rows, dtype=torch.float32).to(device)
    if rows.dim() != 2 or rows.shape[1] != num_params:
        raise ValueError(f"canary_gradients must be [m, {num_params}], got {tuple(rows.shape)}")
    return rows

"""The audit's ONE engine-facing module: canaries into the clipped sum, every step's update out.

The fast engine takes :class:`CanaryInstrument` as its ``instrument=``
(:mod:`dpvision.engines.instrument`): it reads the canaries' RAW rows once, clips each with
the run's rule and C exactly like a real example, samples them with its own sampler, adds the
included ones to the clipped sum before the noise, and hands every step's update to
:meth:`CanaryInstrument.on_update`.

Canaries are Dirac gradients in **audit coordinates**: :class:`AuditCoordinates` appends
m parameters to the model that the loss never depends on (their gradient is exactly 0
for every real example), so a canary's coordinate of the update is

    x_t = (clipped canary, C if sampled at step t else 0) + N(0, (σC)²)      (× 1 / E[B])

with no interference from the data's gradients: the worst case the accountant covers,
realised. A canary's raw row has norm ``RAW_NORM`` × C, so clipping has to act on it.
"""

from __future__ import annotations

import torch
from torch import nn

from dpvision.engines import FastEngine, OptimizerSpec
from dpvision.privacy.plan import Plan

RAW_NORM = 4.0  # a canary's unclipped norm, in units of C: broken clipping lets more than C through


class AuditCoordinates(nn.Module):
    """``base`` plus m parameters (``probe.weight`` [m, 1]) whose gradient is 0 for every example.

    The probe is a Linear layer fed zeros, its output multiplied by 0: every supported per-sample
    backend handles it, and each example's gradient there is dz ⊗ 0 = 0 exactly.
    """

    def __init__(self, base: nn.Module, m: int) -> None:
        super().__init__()
        self.base = base
        self.probe = nn.Linear(1, m, bias=False)
        nn.init.zeros_(self.probe.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.base(x)  # [B, classes]
        touched = self.probe(x.new_zeros(x.shape[0], 1))  # [B, m], all zero
        return logits + 0.0 * touched[:, :1]


class CanaryInstrument:
    """§3's instrument: Dirac canaries at parameter indices ``coords`` [m]; only ``included`` [m] ones enter.

    ``observations`` collects, per step, every canary's coordinate of the update times E[B] / C [m]
    (in units of one clipped canary: about 1 + N(0, σ²) when sampled, N(0, σ²) otherwise).
    """

    def __init__(self, *, coords: torch.Tensor, included: torch.Tensor, num_params: int,
                 max_grad_norm: float, expected_batch: int, device: torch.device | str = "cpu") -> None:
        self.coords = coords.long()  # [m]
        self.included = included.bool()  # [m]
        self.num_params = num_params
        self.unit = expected_batch / max_grad_norm
        self.observations: list[torch.Tensor] = []  # [m] per step
        self.inclusions = 0  # canary inclusions reported by the engine (diagnostics)
        self.max_grad_norm = max_grad_norm
        self.device = torch.device(device)  # the rows are built where the engine keeps them (GBs at full size)

    def canary_gradients(self) -> torch.Tensor:
        """[m_in, P] raw rows: RAW_NORM · C on each included canary's own coordinate."""
        chosen = self.coords[self.included].to(self.device)
        rows = torch.zeros(len(chosen), self.num_params, device=self.device)
        rows[torch.arange(len(chosen), device=self.device), chosen] = RAW_NORM * self.max_grad_norm
        return rows

    def on_inclusions(self, included: torch.Tensor) -> None:
        self.inclusions += int(included.sum())

    def on_update(self, step: int, update: torch.Tensor) -> None:
        del step  # steps arrive in order
        self.observations.append(update.detach()[self.coords.to(update.device)].double().cpu() * self.unit)

    def stacked(self) -> torch.Tensor:
        """[T, m] observations."""
        return torch.stack(self.observations) if self.observations else torch.zeros(0, len(self.coords))


def build_instrumented_engine(*, model: nn.Module, train_data, plan: Plan, lr: float, seed: int, device,
                              instrument: CanaryInstrument | None):
    """The fast engine with the canaries in its clipped sum (plain SGD at ``lr``); without ``instrument``:
    the same run without canaries (the cost comparison's reference)."""
    return FastEngine(model=model, train_data=train_data, plan=plan, optimizer=OptimizerSpec(name="sgd", lr=lr),
                      seed=seed, device=device, instrument=instrument)


def train_observed(engine, *, epochs: int, progress=None) -> int:
    """Run ``epochs`` epochs (the engine hands every step's update to its instrument); returns the steps taken."""
    return sum(engine.train_epoch(progress=progress).steps for _ in range(epochs))

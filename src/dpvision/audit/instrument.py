"""The audit's ONE engine-facing module: canaries into the clipped sum, every step's update out.

Written against the instrument protocol of INTERFACES.md §3 (``canary_gradients()``,
``on_inclusions(included)``, ``on_update(step, update)``). Until the fast engine takes
``instrument=``, :func:`build_instrumented_engine` and :func:`train_observed` drive today's
engine through its legacy ``canary_gradients=`` argument: the canary rows are clipped
here with the flat rule (the legacy engine adds them as given), and each step's update
is read back as (θ_t - θ_{t+1}) / lr (plain SGD, constant rate: exactly the update the
optimizer was handed). The two comments marked ``INTERFACES §3:`` say what switches over.

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

from dpvision.engines import DPSettings, OptimizerSpec, build_engine
from dpvision.engines.per_sample import CLIP_EPS

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
                 max_grad_norm: float, expected_batch: int) -> None:
        self.coords = coords.long()  # [m]
        self.included = included.bool()  # [m]
        self.num_params = num_params
        self.unit = expected_batch / max_grad_norm
        self.observations: list[torch.Tensor] = []  # [m] per step
        self.inclusions = 0  # canary inclusions reported by the engine (diagnostics)
        self.max_grad_norm = max_grad_norm

    def canary_gradients(self) -> torch.Tensor:
        """[m_in, P] raw rows: RAW_NORM · C on each included canary's own coordinate."""
        chosen = self.coords[self.included]
        rows = torch.zeros(len(chosen), self.num_params)
        rows[torch.arange(len(chosen)), chosen] = RAW_NORM * self.max_grad_norm
        return rows

    def on_inclusions(self, included: torch.Tensor) -> None:
        self.inclusions += int(included.sum())

    def on_update(self, step: int, update: torch.Tensor) -> None:
        del step  # steps arrive in order
        self.observations.append(update.detach()[self.coords.to(update.device)].double().cpu() * self.unit)

    def stacked(self) -> torch.Tensor:
        """[T, m] observations."""
        return torch.stack(self.observations) if self.observations else torch.zeros(0, len(self.coords))


def _flat_clip(rows: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """The flat rule min(1, C / (norm + 1e-6)) on [m, P] rows (what the engine does to a real example), in place."""
    return rows.mul_((max_grad_norm / (rows.norm(dim=1, keepdim=True) + CLIP_EPS)).clamp(max=1.0))  # in place


def build_instrumented_engine(*, model: nn.Module, train_data, batch_size: int, lr: float,
                              dp: DPSettings, seed: int, device, instrument: CanaryInstrument):
    """The fast engine with the canaries in its clipped sum (plain SGD at ``lr``)."""
    # INTERFACES §3: build_engine("fast", ..., instrument=instrument) once the plug-in exists.
    canaries = _flat_clip(instrument.canary_gradients(), dp.max_grad_norm)
    return build_engine("fast", model=model, train_data=train_data, batch_size=batch_size,
                        optimizer=OptimizerSpec(name="sgd", lr=lr), dp=dp, seed=seed, device=device,
                        canary_gradients=canaries)


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])  # [P]


def train_observed(engine, instrument: CanaryInstrument, *, steps: int, lr: float, progress=None) -> int:
    """Run ``steps`` DP-SGD steps, handing every step's update to ``instrument``; returns the steps taken."""
    params = list(engine.model.parameters())
    previous = _flat(params)
    for step in range(steps):
        # INTERFACES §3: the engine calls instrument.on_update itself; then run whole epochs instead.
        engine.train_epoch(max_steps=1)
        current = _flat(params)
        instrument.on_update(step, (previous - current) / lr)  # [P]: the update the optimizer was handed
        if engine.canary_included is not None:
            instrument.on_inclusions(engine.canary_included)
        previous = current
        if progress is not None:
            progress(1)
    return steps

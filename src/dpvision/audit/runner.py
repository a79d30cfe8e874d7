"""Audit runs: train once with m canaries, score them, bound ε from below, PASS or FAIL.

Two threat models:

* ``white`` (white-box, the tighter one): Dirac gradient canaries in audit coordinates that
  the data never touches (:mod:`dpvision.audit.instrument`), each Poisson-sampled like a real
  example and clipped like one. The auditor sees every step's update (DP-SGD releases every
  iterate): x_{t,i} is about 1 + N(0, σ²) at steps where canary i was sampled and N(0, σ²)
  otherwise. ``score="steps"`` (all iterates) is the likelihood ratio of the subsampled
  Gaussian, Σ_t log(1 - q + q exp((x_{t,i} - 1/2) / σ²)), the Neyman-Pearson test of one
  canary; ``score="final"`` (last iterate only) is Σ_t x_{t,i}, the canary's coordinate of
  θ_0 - θ_T (:mod:`dpvision.audit.design`). The defaults are full-batch DP-SGD (batch = k, q = 1):
  each step is then a Gaussian mechanism on each canary and the audit comes closest to the claim.
* ``black`` (black-box, input space): each canary is a real MNIST image that is not in the
  training subset, with a label flipped to a random wrong class; the included ones join the
  training set. Score: loss before training minus loss after. Only the final model is used.

Both bounds and the sampling check of :mod:`dpvision.audit.analysis` are computed, on guesses
planned from the claim alone, and (white-box) the noise and clipping checks of
:mod:`dpvision.audit.checks` on the observations; the claim audited is the ledger's (σ, q, T) (what the accountant
was told). ``tamper`` (a callable on the engine) exists for the
bug-injection tests alone (tests/test_audit_bugs.py); no command-line flag reaches it.

Example:
    >>> result = run_audit(AuditConfig(mode="white", canaries=2000, k=500, batch_size=500,  # doctest: +SKIP
    ...                                epochs=4, epsilon=2.0, data_root="data"))
    >>> result["verdict"]                                                                     # doctest: +SKIP
    'PASS'
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpvision.audit.analysis import Claim, analyse
from dpvision.audit.design import SCORES, canary_scores
from dpvision.audit.instrument import AuditCoordinates, CanaryInstrument, build_instrumented_engine, train_observed
from dpvision.checks import need
from dpvision.data.mnist import MNIST_TRAIN_SIZE, load_mnist
from dpvision.data.tensors import ImageTensors
from dpvision.models import SampleConvNet
from dpvision.privacy.accounting import ACCOUNTANTS, PrivacyLedger
from dpvision.privacy.plan import DPSettings, Plan, make_plan, resolve_delta
from dpvision.seeding import make_generator, seed_everything
from dpvision.engines import OptimizerSpec, build_engine

MODES = ("white", "black")
MODELS = ("linear", "convnet")
MAX_CANARIES = 200_000
MAX_CANARY_FLOATS = 2_000_000_000  # white-box rows of the ~m/2 included canaries are [m/2, P + m] floats: 8 GB at most
MAX_PROJECTIONS = 500_000_000  # white-box scores keep [steps, m] floats: 2 GB at most


@dataclass(kw_only=True)
class AuditConfig:
    """One audit: the training run (MNIST subset, model, DP settings) and the canaries."""

    mode: str = "white"
    canaries: int = 20_000
    k: int = 1000  # real training examples (canaries are extra)
    batch_size: int | None = None  # None: k, full-batch DP-SGD (q = 1), the tightest white-box audit
    epochs: int = 10
    lr: float = 0.5
    model: str = "convnet"
    sigma: float | None = None  # noise multiplier; None: calibrated to ``epsilon``
    epsilon: float | None = None  # target ε for the calibration
    max_grad_norm: float = 1.0
    delta: float | str = 1e-5
    accountant: str = "pld"
    disable_dp: bool = False  # σ = 0 (clipping kept): the non-private reference
    score: str = "steps"
    confidence: float = 0.95
    seed: int = 0
    data_root: str = "data"
    device: str = "cpu"

    def __post_init__(self) -> None:
        need(self.mode in MODES, "--mode", f"one of {', '.join(MODES)}", self.mode)
        need(self.score in SCORES, "--score", f"one of {', '.join(SCORES)}", self.score)
        need(self.model in MODELS, "--model", f"one of {', '.join(MODELS)}", self.model)
        need(self.accountant in ACCOUNTANTS, "--accountant", f"one of {', '.join(ACCOUNTANTS)}", self.accountant)
        need(2 <= self.canaries <= MAX_CANARIES, "--canaries", f"an integer between 2 and {MAX_CANARIES}",
             self.canaries)
        need(1 <= self.k and self.k + (self.canaries if self.mode == "black" else 0) <= MNIST_TRAIN_SIZE,
             "--k", "at least 1 and leave room for the black-box canaries in MNIST's 60,000", self.k)
        self.batch_size = self.k if self.batch_size is None else self.batch_size
        need(1 <= self.batch_size <= self.k, "--batch-size", f"between 1 and --k ({self.k})", self.batch_size)
        need(self.epochs >= 1, "--epochs", "a positive integer", self.epochs)
        need(math.isfinite(self.lr) and self.lr > 0, "--lr", "> 0", self.lr)
        need(math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "--max-grad-norm", "a finite number > 0",
             self.max_grad_norm)
        steps = Plan(num_train=self.k, batch_size=self.batch_size, epochs=self.epochs,
                     max_grad_norm=self.max_grad_norm).total_steps
        need(self.mode == "black" or steps * self.canaries <= MAX_PROJECTIONS, "--epochs",
             f"small enough that steps x canaries <= {MAX_PROJECTIONS:.0e} (the white-box scores' memory)", self.epochs)
        need(self.device in ("cpu", "cuda", "auto"), "--device", "one of cpu, cuda, auto", self.device)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device must be cpu or auto on this machine (no CUDA device is available), got 'cuda'")
        need(0 < self.confidence < 1, "--confidence", "in (0, 1)", self.confidence)
        rows = self.canaries // 2 * (self.canaries + sum(p.numel() for p in build_model(self.model).parameters()))
        need(self.mode == "black" or rows <= MAX_CANARY_FLOATS, "--canaries",
             f"small enough that the canary rows (m/2 x (P + m)) stay under {MAX_CANARY_FLOATS:.1e} floats",
             self.canaries)
        self.delta = resolve_delta(self.delta, self.k)
        need(0 < self.delta < 1, "--delta", "in (0, 1)", self.delta)
        if self.disable_dp:
            need(self.sigma in (None, 0.0) and self.epsilon is None, "--disable-dp",
                 "given without --sigma/--epsilon", (self.sigma, self.epsilon))
        else:
            need((self.sigma is None) != (self.epsilon is None), "--sigma/--epsilon", "exactly one of the two",
                 (self.sigma, self.epsilon))
            if self.sigma is not None:
                need(math.isfinite(self.sigma) and self.sigma > 0, "--sigma", "> 0", self.sigma)
            if self.epsilon is not None:
                need(math.isfinite(self.epsilon) and self.epsilon > 0, "--epsilon", "> 0", self.epsilon)


def build_model(name: str) -> nn.Module:
    if name == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    return SampleConvNet()


def _white_box(config: AuditConfig, data: ImageTensors, plan: Plan, included: torch.Tensor,
               device: torch.device, progress, tamper) -> tuple[np.ndarray, int, dict, np.ndarray]:
    """Scores [m], steps, diagnostics and the observations [T, m] (units of one clipped canary)."""
    base = build_model(config.model)
    base_params = sum(p.numel() for p in base.parameters())
    model = AuditCoordinates(base, config.canaries)
    instrument = CanaryInstrument(coords=torch.arange(base_params, base_params + config.canaries),
                                  included=included, num_params=base_params + config.canaries,
                                  max_grad_norm=config.max_grad_norm, expected_batch=plan.expected_batch_size,
                                  device=device)
    engine = build_instrumented_engine(model=model, train_data=data, plan=plan, lr=config.lr, seed=config.seed,
                                       device=device, instrument=instrument)
    if tamper is not None:
        tamper(engine)
    steps = train_observed(engine, epochs=config.epochs, progress=progress)
    observations = instrument.stacked().numpy()  # [T, m]
    scores = canary_scores(observations, score=config.score, sample_rate=plan.sample_rate,
                           noise_multiplier=plan.noise_multiplier)  # [m]
    return scores, steps, {"parameters": base_params, "audit_coordinates": config.canaries,
                           "canary_inclusions": instrument.inclusions}, observations


def _mislabelled(pool: ImageTensors, generator: torch.Generator) -> ImageTensors:
    """The black-box canaries: the pool's images, each with a wrong label (easy to memorise)."""
    wrong = (pool.labels + torch.randint(1, 10, (len(pool),), generator=generator)) % 10
    return ImageTensors(pool.images, wrong, pool.mean, pool.std)


def _black_box(config: AuditConfig, canaries: ImageTensors, data: ImageTensors, included: torch.Tensor,
               plan: Plan, device: torch.device, progress, tamper) -> tuple[np.ndarray, int, dict]:
    chosen = canaries.subset(torch.nonzero(included).reshape(-1))
    train = ImageTensors(torch.cat([data.images, chosen.images]), torch.cat([data.labels, chosen.labels]),
                         data.mean, data.std)
    model = build_model(config.model).to(device)

    def losses() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            logits = model(canaries.normalize(canaries.images.to(device)))
            out = F.cross_entropy(logits, canaries.labels.to(device), reduction="none").cpu()
        model.train()  # the engines (and Opacus's validator) need a model in training mode
        return out

    before = losses()
    engine = build_engine("fast", model=model, train_data=train, plan=plan,
                          optimizer=OptimizerSpec(name="sgd", lr=config.lr), seed=config.seed, device=device)
    if tamper is not None:
        tamper(engine)
    steps = 0
    for _ in range(config.epochs):
        steps += engine.train_epoch(progress=progress).steps
    model = engine.model
    scores = (before - losses()).double()  # how much training lowered each canary's loss
    return scores.numpy(), steps, {"training_examples": len(train)}


def audit_plan(config: AuditConfig, num_train: int) -> Plan:
    """The audited run's plan: σ given, calibrated to ``epsilon``, or 0 (``disable_dp``: clipping, no noise)."""
    dp = DPSettings(noise_multiplier=0.0 if config.disable_dp else config.sigma,
                    target_epsilon=None if config.disable_dp else config.epsilon,
                    max_grad_norm=config.max_grad_norm, delta=config.delta, accountant=config.accountant)
    return make_plan(dp, num_train=num_train, batch_size=config.batch_size, epochs=config.epochs)


def audit_device(config: AuditConfig) -> torch.device:
    return torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                        "cpu" if config.device == "auto" else config.device)


def audit_data(config: AuditConfig) -> tuple[ImageTensors, ImageTensors]:
    """The training subset (k MNIST images) and the black-box canary pool (never in it); seeds everything."""
    seed_everything(config.seed)
    full = load_mnist(config.data_root, train=True)
    order = torch.randperm(len(full), generator=make_generator(config.seed, "subset"))
    return full.subset(order[:config.k]), full.subset(order[config.k:config.k + config.canaries])


def run_audit(config: AuditConfig, *, progress=None, tamper=None) -> dict:
    """Train once with canaries, score them and return the audit as a JSON-ready dict.

    ``progress(steps_done)`` is called as training goes; ``tamper(engine)`` breaks the engine on
    purpose (bug-injection tests only).
    """
    started = time.perf_counter()
    device = audit_device(config)
    data, pool = audit_data(config)
    generator = make_generator(config.seed, "audit")
    included = torch.rand(config.canaries, generator=generator) < 0.5  # S_i: each in with probability 1/2
    # q and the epoch length as the audited run has them (black-box canaries join the data).
    n_train = config.k + (int(included.sum()) if config.mode == "black" else 0)
    plan = audit_plan(config, n_train)
    sigma, q = plan.noise_multiplier, plan.sample_rate
    if config.mode == "white":
        scores, steps, extra, observations = _white_box(config, data, plan, included, device, progress,
                                                        tamper)
    else:
        observations = None  # black-box: only the final model's losses are seen
        canaries = _mislabelled(pool, generator)
        scores, steps, extra = _black_box(config, canaries, data, included, plan, device, progress, tamper)
    ledger = PrivacyLedger()  # what the accountant is told: the configured (σ, q) for the steps taken
    if sigma > 0:
        ledger.record(noise_multiplier=sigma, sample_rate=q, steps=steps)
    epsilons = ({name: math.inf for name in ACCOUNTANTS} if sigma == 0 else ledger.epsilons(delta=config.delta))
    claimed = epsilons[config.accountant]
    claim = Claim(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=config.delta)
    result = analyse(scores, included.numpy(), claim, score=config.score, claimed_epsilon=claimed,
                     confidence=config.confidence, observations=observations)
    return {
        "verdict": result.verdict, "epsilon_lower_bound": result.epsilon_lower_bound, "analysis": result.analysis,
        "steinke": result.steinke, "fdp": result.fdp, "sampling": result.sampling, "checks": result.checks,
        "plan": result.plan,
        "epsilon": claimed, "accountant": config.accountant,
        "epsilons": epsilons, "epsilon_claimed_curve_pld": result.claimed_epsilon_pld, "delta": config.delta,
        "confidence": config.confidence, "threat_model": THREAT_MODELS[(config.mode, config.score)],
        "canaries": config.canaries, "canaries_included": int(included.sum()), "guess_table": result.guess_table,
        "noise_multiplier": sigma, "sample_rate": q, "steps": steps, **extra, "config": asdict(config),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }


THREAT_MODELS = {("white", "steps"): "white-box, all iterates", ("white", "final"): "white-box, last iterate",
                 ("black", "steps"): "black-box, final model", ("black", "final"): "black-box, final model"}

"""Audit runs: train once with m canaries, score them, bound ε from below.

Two threat models:

* ``white`` (white-box, gradient space; the tighter one): each canary is a
  random direction c_i of norm C in parameter space, handed to the fast engine
  as a ``canary_gradients`` row, i.e. an extra example whose clipped gradient is
  c_i, Poisson-sampled with the run's rate q at every step. The auditor sees
  every model iterate. With plain SGD, θ_t - θ_{t+1} = (lr / B) · (noisy clipped
  sum), so x_{t,i} = <c_i, θ_t - θ_{t+1}> · B / (lr C²) is ~N(1, σ²) at steps
  where canary i was sampled and ~N(0, σ²) otherwise (plus the projection of the
  real gradients). ``score="steps"`` is the likelihood ratio of the subsampled
  Gaussian, Σ_t log(1 - q + q exp((x_{t,i} - 1/2) / σ²)); ``score="final"`` is
  <c_i, θ_0 - θ_T> (last iterate only).
* ``black`` (black-box, input space): each canary is a real MNIST image that is
  not in the training subset, with a label flipped to a random wrong class; the
  included ones join the training set. Score: loss before training minus loss
  after (the model learnt it).

The ε being checked is the accountant's ε for the steps actually taken (at the
run's σ, q, δ; canaries are sampled at the same q as real examples).

Example:
    >>> result = run_audit(AuditConfig(mode="white", canaries=1000, k=500, batch_size=50,  # doctest: +SKIP
    ...                                epochs=2, epsilon=2.0, data_root="data"))
    >>> result["epsilon_lower_bound"] <= result["epsilon"]                                    # doctest: +SKIP
    True
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dpvision.audit.stats import audit_scores
from dpvision.data.mnist import MNIST_TRAIN_SIZE, load_mnist
from dpvision.data.tensors import ImageTensors
from dpvision.models import SampleConvNet
from dpvision.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyLedger,
    calibrate_noise_multiplier,
    poisson_sample_rate,
    resolve_delta,
    steps_per_epoch,
)
from dpvision.seeding import make_generator, seed_everything
from dpvision.engines import DPSettings, OptimizerSpec, build_engine
from dpvision.jobs.loop import train_private_epoch
from dpvision.privacy.plan import make_plan

MODES = ("white", "black")
SCORES = ("steps", "final")
MODELS = ("linear", "convnet")
MAX_CANARIES = 20_000  # white-box canaries are [m, P] floats: 20k x 26k params = 2 GB at most
MAX_PROJECTIONS = 500_000_000  # white-box scores keep [steps, m] floats: 2 GB at most
MIN_SCORE_SIGMA = 0.5  # the likelihood-ratio score's σ when the run claims none (non-private runs)


@dataclass(kw_only=True)
class AuditConfig:
    """One audit: the training run (MNIST subset, model, DP settings) and the canaries."""

    mode: str = "white"
    canaries: int = 1000
    k: int = 10_000  # real training examples (canaries are extra)
    batch_size: int = 250
    epochs: int = 5
    lr: float = 0.5
    model: str = "convnet"
    sigma: float | None = None  # noise multiplier; None: calibrated to ``epsilon``
    epsilon: float | None = None  # target ε for the calibration
    max_grad_norm: float = 1.0
    delta: float | str = 1e-5
    accountant: str = "rdp"
    disable_dp: bool = False  # σ = 0 (clipping kept): the non-private reference
    noise_scale_for_testing: float = 1.0  # < 1: a deliberately broken run the audit must catch
    score: str = "steps"
    confidence: float = 0.95
    seed: int = 0
    data_root: str = "data"
    device: str = "cpu"

    def __post_init__(self) -> None:
        def need(ok: bool, flag: str, valid: str, value) -> None:
            if not ok:
                raise ValueError(f"{flag} must be {valid}, got {value!r}")

        need(self.mode in MODES, "--mode", f"one of {', '.join(MODES)}", self.mode)
        need(self.score in SCORES, "--score", f"one of {', '.join(SCORES)}", self.score)
        need(self.model in MODELS, "--model", f"one of {', '.join(MODELS)}", self.model)
        need(self.accountant in ACCOUNTANTS, "--accountant", f"one of {', '.join(ACCOUNTANTS)}", self.accountant)
        need(2 <= self.canaries <= MAX_CANARIES, "--canaries", f"an integer between 2 and {MAX_CANARIES}",
             self.canaries)
        need(1 <= self.k and self.k + (self.canaries if self.mode == "black" else 0) <= MNIST_TRAIN_SIZE,
             "--k", "at least 1 and leave room for the black-box canaries in MNIST's 60,000", self.k)
        need(1 <= self.batch_size <= self.k, "--batch-size", f"between 1 and --k ({self.k})", self.batch_size)
        need(self.epochs >= 1, "--epochs", "a positive integer", self.epochs)
        steps = self.epochs * steps_per_epoch(poisson_sample_rate(self.k, self.batch_size))
        need(self.mode == "black" or steps * self.canaries <= MAX_PROJECTIONS, "--epochs",
             f"small enough that steps x canaries <= {MAX_PROJECTIONS:.0e} (the white-box scores' memory)", self.epochs)
        need(math.isfinite(self.lr) and self.lr > 0, "--lr", "> 0", self.lr)
        need(math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "--max-grad-norm", "a finite number > 0",
             self.max_grad_norm)
        need(self.device in ("cpu", "cuda", "auto"), "--device", "one of cpu, cuda, auto", self.device)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device must be cpu or auto on this machine (no CUDA device is available), got 'cuda'")
        need(0 < self.confidence < 1, "--confidence", "in (0, 1)", self.confidence)
        need(self.noise_scale_for_testing >= 0, "noise_scale_for_testing", ">= 0", self.noise_scale_for_testing)
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


def _flat(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])  # [P]


def _subsampled_gaussian_llr(x: torch.Tensor, q: float, sigma: float) -> torch.Tensor:
    """Σ_t log(1 - q + q exp((x - 1/2) / σ²)) over steps; x [T, m] -> [m]."""
    z = (x.double() - 0.5) / sigma**2
    return torch.logaddexp(torch.full_like(z, math.log1p(-q)), z + math.log(q)).sum(0)


def _white_box(config: AuditConfig, data: ImageTensors, sigma: float, included: torch.Tensor,
               generator: torch.Generator, device: torch.device) -> tuple[np.ndarray, PrivacyLedger, dict]:
    model = build_model(config.model)
    num_params = sum(p.numel() for p in model.parameters())
    directions = torch.randn(config.canaries, num_params, generator=generator)  # [m, P]
    # Norm just under C: the engine checks norm <= C and a canary is an example clipped to C.
    canaries = directions / directions.norm(dim=1, keepdim=True) * (config.max_grad_norm * (1 - 1e-6))
    engine = build_engine("fast", model=model, train_data=data, batch_size=config.batch_size,
                          optimizer=OptimizerSpec(name="sgd", lr=config.lr),
                          dp=DPSettings(noise_multiplier=sigma, max_grad_norm=config.max_grad_norm),
                          seed=config.seed, device=device, canary_gradients=canaries[included],
                          noise_scale_for_testing=config.noise_scale_for_testing)
    params = [p for p in engine.model.parameters()]
    c_dev = canaries.to(device)
    theta0 = _flat(params)
    total = config.epochs * engine.steps_per_epoch
    # One step per call, so that every iterate is seen (the white-box threat model).
    unit = engine.expected_batch / (config.lr * config.max_grad_norm**2)
    projections, ledger, previous = [], PrivacyLedger(), theta0
    plan = make_plan(num_train=len(data), batch_size=config.batch_size, epochs=config.epochs, noise_multiplier=sigma,
                     max_grad_norm=config.max_grad_norm)
    for _ in range(total):
        train_private_epoch(engine, ledger, plan, max_steps=1)
        current = _flat(params)
        projections.append((c_dev @ (previous - current)).cpu() * unit)  # [m]
        previous = current
    x = torch.stack(projections)  # [T, m]
    if config.score == "final":
        scores = (c_dev @ (theta0 - previous)).cpu().double()
    else:
        scores = _subsampled_gaussian_llr(x, engine.sample_rate, max(sigma, MIN_SCORE_SIGMA))
    return scores.numpy(), ledger, {"sample_rate": engine.sample_rate, "parameters": num_params}


def _black_box(config: AuditConfig, pool: ImageTensors, data: ImageTensors, included: torch.Tensor,
               sigma: float, generator: torch.Generator, device: torch.device) -> tuple[np.ndarray, PrivacyLedger, dict]:
    candidates = pool
    wrong = (candidates.labels + torch.randint(1, 10, (len(candidates),), generator=generator)) % 10
    canaries = ImageTensors(candidates.images, wrong, pool.mean, pool.std)  # mislabelled: easy to memorise
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
    engine = build_engine("fast", model=model, train_data=train, batch_size=config.batch_size,
                          optimizer=OptimizerSpec(name="sgd", lr=config.lr),
                          dp=DPSettings(noise_multiplier=sigma, max_grad_norm=config.max_grad_norm),
                          seed=config.seed, device=device, noise_scale_for_testing=config.noise_scale_for_testing)
    ledger = PrivacyLedger()
    plan = make_plan(num_train=len(train), batch_size=config.batch_size, epochs=config.epochs, noise_multiplier=sigma,
                     max_grad_norm=config.max_grad_norm)
    for _ in range(config.epochs):
        train_private_epoch(engine, ledger, plan)
    model = engine.model
    scores = (before - losses()).double()  # how much training lowered each canary's loss
    return scores.numpy(), ledger, {"sample_rate": engine.sample_rate, "training_examples": len(train)}


def run_audit(config: AuditConfig) -> dict:
    """Train once with canaries, score them and return the audit as a JSON-ready dict."""
    started = time.perf_counter()
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    seed_everything(config.seed)
    full = load_mnist(config.data_root, train=True)
    order = torch.randperm(len(full), generator=make_generator(config.seed, "subset"))
    data = full.subset(order[:config.k])
    pool = full.subset(order[config.k:config.k + config.canaries])  # black-box canaries: never in `data`
    generator = make_generator(config.seed, "audit")
    included = torch.rand(config.canaries, generator=generator) < 0.5  # S_i: each in with probability 1/2
    # q and the epoch length as the audited run will have them (black-box canaries join the data).
    n_train = config.k + (int(included.sum()) if config.mode == "black" else 0)
    q = poisson_sample_rate(n_train, config.batch_size)
    if config.disable_dp:
        sigma = 0.0
    elif config.sigma is not None:
        sigma = float(config.sigma)
    else:
        sigma = calibrate_noise_multiplier(target_epsilon=config.epsilon, delta=config.delta, sample_rate=q,
                                           steps=config.epochs * steps_per_epoch(q), accountant=config.accountant)
    if config.mode == "white":
        scores, ledger, extra = _white_box(config, data, sigma, included, generator, device)
    else:
        scores, ledger, extra = _black_box(config, pool, data, included, sigma, generator, device)
    bound = audit_scores(scores, included.numpy(), delta=config.delta, confidence=config.confidence)
    epsilons = ({name: math.inf for name in ACCOUNTANTS} if sigma == 0
                else ledger.epsilons(delta=config.delta))
    claimed = epsilons[config.accountant]
    consistent = bound.epsilon_lower_bound <= claimed
    verdict = (f"audit ({config.mode}-box, m={config.canaries}): epsilon >= {bound.epsilon_lower_bound:.3f} at "
               f"{config.confidence:.0%} confidence ({bound.correct}/{bound.guesses} correct guesses); the "
               f"{config.accountant} accountant claims epsilon = {claimed:.3f} (delta = {config.delta:g}): "
               + ("consistent" if consistent else "VIOLATION: the run leaks more than its accountant claims"))
    return {
        "verdict": verdict, "consistent": consistent, "epsilon_lower_bound": bound.epsilon_lower_bound,
        "epsilon": claimed, "accountant": config.accountant, "epsilons": epsilons, "delta": config.delta,
        "confidence": config.confidence, "canaries": config.canaries, "canaries_included": int(included.sum()),
        "k_plus": bound.k_plus, "k_minus": bound.k_minus, "guesses": bound.guesses, "correct": bound.correct,
        "pairs_tried": bound.pairs_tried, "guess_table": bound.table, "noise_multiplier": sigma,
        "steps": ledger.steps if sigma > 0 else config.epochs * steps_per_epoch(q), **extra,
        "config": asdict(config), "wall_seconds": round(time.perf_counter() - started, 3),
    }

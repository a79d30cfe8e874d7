"""The MNIST job: SampleConvNet, standard or DP-SGD training, a per-epoch CSV.

Reads top to bottom like Opacus's ``examples/mnist.py``: ``train()`` runs one
epoch, ``test()`` measures accuracy on the 10,000 test images, ``main()`` ties
them together. DP is the single ``dp=`` argument of the engine; the baseline
is the same config with ``disable_dp=True``.

Example:
    >>> from dpvision.mnist import MnistConfig, run
    >>> summary = run(MnistConfig(epochs=1, k=1000, batch_size=100, quiet=True))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from dpvision.data.mnist import MNIST_TRAIN_SIZE, load_mnist, random_subset
from dpvision.data.tensors import ImageTensors
from dpvision.models import SampleConvNet
from dpvision.privacy.accounting import (
    PrivacyLedger,
    calibrate_noise_multiplier,
    poisson_sample_rate,
    steps_per_epoch,
)
from dpvision.runs import RunDir, atomic_write_text, csv_text, library_versions
from dpvision.seeding import make_generator, seed_everything
from dpvision.training.engine import ENGINES, DPSettings, Engine, OptimizerSpec, build_engine, evaluate

SEED_CSV_COLUMNS = ["Epoch", "Train Accuracy", "Test Accuracy", "Epsilon", "Delta"]
METRIC_COLUMNS = [
    "epoch", "steps", "sample_rate", "noise_multiplier", "max_grad_norm", "train_loss",
    "train_accuracy", "test_accuracy", "epsilon", "delta", "seconds",
]
DEVICES = ("auto", "cpu", "cuda")


@dataclass(kw_only=True)
class MnistConfig:
    """Every setting of ``python mnist.py``; field names follow the seed's flags."""

    batch_size: int = 256
    test_batch_size: int = 1024
    epochs: int = 30
    lr: float = 0.15
    sigma: float = 1.3
    max_per_sample_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilon: float = 0.3  # the seed's "initial ε": a file-name label unless epsilon_is_target
    epsilon_is_target: bool = False  # True when --epsilon was given: σ is calibrated to reach it
    k: int = 30_000
    disable_dp: bool = False
    device: str = "auto"
    engine: str = "opacus"
    data_root: str = "data"
    out_dir: str = "mnist"
    runs_dir: str = "runs"
    run_name: str | None = None
    seed: int = 0
    quiet: bool = False
    download: bool = True

    def __post_init__(self) -> None:
        def need(ok: bool, flag: str, valid: str, value) -> None:
            if not ok:
                raise ValueError(f"{flag} must be {valid}, got {value!r}")

        need(self.batch_size >= 1, "--batch-size", "a positive integer", self.batch_size)
        need(self.test_batch_size >= 1, "--test-batch-size", "a positive integer", self.test_batch_size)
        need(self.epochs >= 1, "--epochs", "a positive integer", self.epochs)
        need(math.isfinite(self.lr) and self.lr >= 0, "--lr", ">= 0", self.lr)
        need(math.isfinite(self.sigma) and self.sigma >= 0, "--sigma", ">= 0", self.sigma)
        need(math.isfinite(self.max_per_sample_grad_norm) and self.max_per_sample_grad_norm > 0,
             "--max-per-sample-grad-norm", "> 0", self.max_per_sample_grad_norm)
        need(0 < self.delta < 1, "--delta", "in (0, 1)", self.delta)
        need(1 <= self.k <= MNIST_TRAIN_SIZE, "--k", f"between 1 and {MNIST_TRAIN_SIZE}", self.k)
        need(self.batch_size <= self.k, "--batch-size", f"at most --k ({self.k})", self.batch_size)
        need(self.device in DEVICES, "--device", f"one of {', '.join(DEVICES)}", self.device)
        need(self.engine in ENGINES, "--engine", f"one of {', '.join(ENGINES)}", self.engine)
        if self.epsilon_is_target:
            need(math.isfinite(self.epsilon) and self.epsilon > 0, "--epsilon", "a positive number", self.epsilon)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device must be cpu or auto on this machine (no CUDA device is available), got 'cuda'")

    @property
    def sample_rate(self) -> float:
        return poisson_sample_rate(self.k, self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * steps_per_epoch(self.sample_rate)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def resolve_noise_multiplier(config: MnistConfig) -> float:
    """σ actually used: ``--sigma``, or calibrated so the whole run ends at the ``--epsilon`` target."""
    if config.disable_dp or not config.epsilon_is_target:
        return config.sigma
    try:
        return calibrate_noise_multiplier(target_epsilon=config.epsilon, delta=config.delta,
                                          sample_rate=config.sample_rate, steps=config.total_steps)
    except ValueError as err:
        raise ValueError(f"--epsilon: {err}") from None


def seed_csv_path(config: MnistConfig, noise_multiplier: float) -> Path:
    """``<out-dir>/mnist_{lr}_{sigma}_{C}_{batch}_{epochs}_{epsilon}_{k}.csv``, as the seed names it."""
    sigma = f"{noise_multiplier:.4g}" if config.epsilon_is_target else str(config.sigma)
    name = (f"mnist_{config.lr}_{sigma}_{config.max_per_sample_grad_norm}_{config.batch_size}"
            f"_{config.epochs}_{config.epsilon}_{config.k}.csv")
    return Path(config.out_dir) / name


def check_can_create_dir(path: str | os.PathLike, flag: str) -> None:
    """Raise ``ValueError`` naming ``flag`` if ``path`` could not be created or written; create nothing."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} must be a writable directory, got {str(path)!r} ({probe} is not writable)")


def validate(config: MnistConfig) -> float:
    """Every check that can fail before anything is written; returns σ."""
    noise_multiplier = resolve_noise_multiplier(config)
    check_can_create_dir(config.out_dir, "--out-dir")
    check_can_create_dir(config.runs_dir, "--runs-dir")
    if not config.disable_dp and config.delta >= 1 / config.k:
        warnings.warn(f"--delta {config.delta} is at least 1/k = 1/{config.k}: too large to be a meaningful "
                      "privacy guarantee (use delta << 1/k)", stacklevel=2)
    return noise_multiplier


def train(engine: Engine, epoch: int, quiet: bool):
    """One epoch of training behind a progress bar over the steps."""
    with tqdm(total=engine.steps_per_epoch, desc=f"Epoch {epoch}", unit="step", leave=False,
              disable=quiet, file=sys.stderr) as bar:
        return engine.train_epoch(progress=bar.update)


def test(model: torch.nn.Module, test_data: ImageTensors, config: MnistConfig, device: torch.device) -> float:
    """Accuracy on the full 10,000-image test set."""
    _, accuracy, _ = evaluate(model, test_data, batch_size=config.test_batch_size, device=device)
    return accuracy


def run(config: MnistConfig) -> dict:
    """Train, write the seed CSV and the run folder after every epoch, return the summary."""
    noise_multiplier = validate(config)
    device = resolve_device(config.device)
    dp = None if config.disable_dp else DPSettings(noise_multiplier=noise_multiplier,
                                                   max_grad_norm=config.max_per_sample_grad_norm)
    seed_everything(config.seed)
    train_data = random_subset(load_mnist(config.data_root, train=True, download=config.download),
                               config.k, make_generator(config.seed, "subset"))
    test_data = load_mnist(config.data_root, train=False, download=config.download)

    engine = build_engine(config.engine, model=SampleConvNet(), train_data=train_data,
                          batch_size=config.batch_size, optimizer=OptimizerSpec(name="sgd", lr=config.lr),
                          dp=dp, seed=config.seed, device=device)
    ledger = PrivacyLedger()
    csv_path = seed_csv_path(config, noise_multiplier)
    run_dir = RunDir.create(config.runs_dir, "mnist", config.run_name or csv_path.stem, METRIC_COLUMNS)
    resolved = {**asdict(config), "noise_multiplier": noise_multiplier, "sample_rate": engine.sample_rate,
                "steps_per_epoch": engine.steps_per_epoch, "device_resolved": str(device), "engine": engine.name}
    run_dir.write_config(resolved)
    if not config.quiet:
        mode = "standard SGD (no DP)" if dp is None else (
            f"DP-SGD: sigma={noise_multiplier:.6g}, C={config.max_per_sample_grad_norm}, "
            f"q={engine.sample_rate:.6g}, {engine.steps_per_epoch} steps/epoch")
        print(f"Training SampleConvNet on {len(train_data)} MNIST images on {device} with {mode}; "
              f"run folder {run_dir.path}", flush=True)

    rows, started = [], time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        result = train(engine, epoch, config.quiet)
        if dp is not None:
            ledger.record(noise_multiplier=noise_multiplier, sample_rate=engine.sample_rate, steps=result.steps)
        epsilon = math.inf if dp is None else ledger.epsilon(delta=config.delta)
        test_accuracy = test(engine.model, test_data, config, device)
        seconds = time.perf_counter() - epoch_start
        rows.append({"Epoch": epoch, "Train Accuracy": result.accuracy, "Test Accuracy": test_accuracy,
                     "Epsilon": epsilon, "Delta": config.delta})
        atomic_write_text(csv_path, csv_text(SEED_CSV_COLUMNS, rows))
        run_dir.append_metrics({
            "epoch": epoch, "steps": ledger.steps if dp else epoch * engine.steps_per_epoch,
            "sample_rate": engine.sample_rate, "noise_multiplier": noise_multiplier if dp else 0.0,
            "max_grad_norm": config.max_per_sample_grad_norm if dp else math.inf,
            "train_loss": result.loss, "train_accuracy": result.accuracy, "test_accuracy": test_accuracy,
            "epsilon": epsilon, "delta": config.delta, "seconds": round(seconds, 3),
        })
        if not config.quiet:
            print(f"Epoch {epoch:3d} | train acc {result.accuracy:.4f} | test acc {test_accuracy:.4f} | "
                  f"ε = {epsilon:.4f} (δ = {config.delta:g}) | {seconds:.1f}s", flush=True)

    run_dir.save_model(engine.model)
    summary = {
        "job": "mnist", "epochs": config.epochs, "steps": ledger.steps if dp else config.epochs * engine.steps_per_epoch,
        "train_accuracy": rows[-1]["Train Accuracy"], "test_accuracy": rows[-1]["Test Accuracy"],
        "epsilon": rows[-1]["Epsilon"], "delta": config.delta, "noise_multiplier": noise_multiplier if dp else 0.0,
        "sample_rate": engine.sample_rate, "dp": dp is not None, "engine": engine.name,
        "device": str(device), "versions": library_versions(), "csv": str(csv_path),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    run_dir.write_summary(summary)
    return summary

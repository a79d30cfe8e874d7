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
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from dpvision.cli_support import check_can_create_dir, resolve_device
from dpvision.data.mnist import MNIST_TRAIN_SIZE, load_mnist, random_subset
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
from dpvision.privacy.budget import PrivacyBudget
from dpvision.runs import RunDir, atomic_write_text, csv_text, library_versions
from dpvision.seeding import make_generator, seed_everything
from dpvision.engines import ENGINES, DPSettings, Engine, OptimizerSpec, build_engine, evaluate
from dpvision.jobs.loop import EPSILON_COLUMNS, Checkpointer, EpochOutcome, epsilon_columns, train_private_epoch

SEED_CSV_COLUMNS = ["Epoch", "Train Accuracy", "Test Accuracy", "Epsilon", "Delta"]
METRIC_COLUMNS = [
    "epoch", "steps", "sample_rate", "noise_multiplier", "max_grad_norm", "train_loss",
    "train_accuracy", "test_accuracy", "epsilon", "delta", "seconds", "accountant", *EPSILON_COLUMNS,
]
DEVICES = ("auto", "cpu", "cuda")
# Config keys that cannot change the result: a resumed run may set them anew (and
# they are left out of the checkpoint's config fingerprint).
RESUME_FREE_KEYS = ("data_root", "device", "device_resolved", "quiet", "download")
RESUME_FLAGS = ("--resume", "--data-root", "--device", "--quiet")


@dataclass(kw_only=True)
class MnistConfig:
    """Every setting of ``python mnist.py``; field names follow the seed's flags."""

    batch_size: int = 256
    test_batch_size: int = 1024
    epochs: int = 30
    lr: float = 0.15
    sigma: float = 1.3
    max_per_sample_grad_norm: float = 1.0
    delta: float | str = 1e-5  # "auto": 1 / (10 k), resolved here
    epsilon: float = 0.3  # the seed's "initial ε": a file-name label unless epsilon_is_target
    epsilon_is_target: bool = False  # True when --epsilon was given: σ is calibrated to reach it
    k: int = 30_000
    disable_dp: bool = False
    device: str = "auto"
    engine: str = "fast"  # falls back to "opacus" (with a notice) for models it does not support
    data_root: str = "data"
    out_dir: str = "mnist"
    runs_dir: str = "runs"
    run_name: str | None = None
    seed: int = 0
    quiet: bool = False
    download: bool = True
    accountant: str = "rdp"  # the ε that is reported, calibrated to and budgeted (the others go to metrics.csv)
    max_epsilon: float | None = None  # budget: stop before the first step that would exceed it

    def __post_init__(self) -> None:
        self.delta = resolve_delta(self.delta, self.k)

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
        need(self.accountant in ACCOUNTANTS, "--accountant", f"one of {', '.join(ACCOUNTANTS)}", self.accountant)
        if self.max_epsilon is not None:
            need(math.isfinite(self.max_epsilon) and self.max_epsilon > 0, "--max-epsilon", "a positive number",
                 self.max_epsilon)
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


def resolve_noise_multiplier(config: MnistConfig) -> float:
    """σ actually used: ``--sigma``, or calibrated so the whole run ends at the ``--epsilon`` target."""
    if config.disable_dp or not config.epsilon_is_target:
        return config.sigma
    try:
        return calibrate_noise_multiplier(target_epsilon=config.epsilon, delta=config.delta,
                                          sample_rate=config.sample_rate, steps=config.total_steps,
                                          accountant=config.accountant)
    except ValueError as err:
        raise ValueError(f"--epsilon: {err}") from None


def seed_csv_path(config: MnistConfig, noise_multiplier: float) -> Path:
    """``<out-dir>/mnist_{lr}_{sigma}_{C}_{batch}_{epochs}_{epsilon}_{k}.csv``, as the seed names it."""
    sigma = f"{noise_multiplier:.4g}" if config.epsilon_is_target else str(config.sigma)
    name = (f"mnist_{config.lr}_{sigma}_{config.max_per_sample_grad_norm}_{config.batch_size}"
            f"_{config.epochs}_{config.epsilon}_{config.k}.csv")
    return Path(config.out_dir) / name


def validate(config: MnistConfig) -> float:
    """Every check that can fail before anything is written; returns σ."""
    noise_multiplier = resolve_noise_multiplier(config)
    check_can_create_dir(config.out_dir, "--out-dir")
    check_can_create_dir(config.runs_dir, "--runs-dir")
    if not config.disable_dp and config.delta >= 1 / config.k:
        warnings.warn(f"--delta {config.delta} is at least 1/k = 1/{config.k}: too large to be a meaningful "
                      "privacy guarantee (use delta << 1/k)", stacklevel=2)
    return noise_multiplier


def train(engine: Engine, ledger: PrivacyLedger, epoch: int, config: MnistConfig, noise_multiplier: float,
          hook: Callable[[str, int], None] | None = None) -> EpochOutcome:
    """One epoch of training behind a progress bar, stopped short by ``--max-epsilon`` if it must."""
    budget = None
    if config.max_epsilon is not None:
        budget = PrivacyBudget(max_epsilon=config.max_epsilon, delta=config.delta, accountant=config.accountant)
    with tqdm(total=engine.steps_per_epoch, desc=f"Epoch {epoch}", unit="step", leave=False,
              disable=config.quiet, file=sys.stderr) as bar:
        done = [0]  # a disabled tqdm does not count

        def progress(steps: int) -> None:
            bar.update(steps)
            done[0] += steps
            if hook:
                hook("step", done[0])

        return train_private_epoch(engine, ledger, noise_multiplier=noise_multiplier, budget=budget,
                                   progress=progress)


def test(model: torch.nn.Module, test_data: ImageTensors, config: MnistConfig, device: torch.device) -> float:
    """Accuracy on the full 10,000-image test set."""
    _, accuracy, _ = evaluate(model, test_data, batch_size=config.test_batch_size, device=device)
    return accuracy


def load_resume_config(run_path: str | os.PathLike, **overrides) -> tuple[MnistConfig, dict]:
    """The config of the run in ``run_path`` (its ``config.yaml``), with ``overrides`` of free keys only.

    Returns the ``MnistConfig`` and the saved resolved config (σ, q, ... as the run used them).
    """
    run_dir = RunDir(run_path)
    if not (run_dir.path / RunDir.CONFIG).is_file():
        raise ValueError(f"--resume must be a run folder holding {RunDir.CONFIG}, got {str(run_path)!r}")
    saved = run_dir.read_config()
    if not isinstance(saved, dict) or saved.get("job", "mnist") != "mnist" or "noise_multiplier" not in saved:
        raise ValueError(f"--resume must be an MNIST run folder, got {str(run_path)!r}")
    bad = set(overrides) - set(RESUME_FREE_KEYS)
    if bad:
        raise ValueError(f"cannot override {sorted(bad)} when resuming")
    names = {f.name for f in fields(MnistConfig)}
    values = {k: v for k, v in saved.items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return MnistConfig(**values), saved


def run(config: MnistConfig, *, resume: str | os.PathLike | None = None,
        hook: Callable[[str, int], None] | None = None) -> dict:
    """Train, write the seed CSV and the run folder after every epoch, return the summary.

    ``resume`` continues the run folder it names; ``config`` must then come from
    :func:`load_resume_config` (a foreign checkpoint is refused by its fingerprint). ``hook(event, n)`` is called after every step
    (``"step"``, steps so far this epoch) and after every epoch's files are written
    (``"epoch"``, epoch): tests raise from it to simulate an interruption.
    """
    if resume is None:
        noise_multiplier = validate(config)
    else:  # σ exactly as the run used it (a recalibration could differ across library versions)
        noise_multiplier = float(RunDir(resume).read_config()["noise_multiplier"])
        check_can_create_dir(config.out_dir, "--out-dir")
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
    if resume is None:
        run_dir = RunDir.create(config.runs_dir, "mnist", config.run_name or csv_path.stem, METRIC_COLUMNS)
        run_dir.write_config({"job": "mnist", **asdict(config), "noise_multiplier": noise_multiplier,
                              "sample_rate": engine.sample_rate, "steps_per_epoch": engine.steps_per_epoch,
                              "device_resolved": str(device), "engine": engine.name})
    else:
        run_dir = RunDir(resume, METRIC_COLUMNS)
    # The fingerprint is taken from the file as saved, so a run and its resume agree bit for bit.
    checkpointer = Checkpointer(run_dir.path, run_dir.read_config(), ignore=RESUME_FREE_KEYS)
    state = checkpointer.restore(engine, ledger) if resume is not None else None
    extra = state["extra"] if state else {}
    rows, metric_rows = list(extra.get("rows", [])), list(extra.get("metrics", []))
    stop_reason: str | None = extra.get("stop_reason")
    start_epoch = state["epoch"] + 1 if state else 1
    if resume is not None:
        if rows:  # the seed CSV and metrics.csv hold exactly the checkpointed epochs
            atomic_write_text(csv_path, csv_text(SEED_CSV_COLUMNS, rows))
        run_dir.rewrite_metrics(metric_rows)
    if not config.quiet:
        mode = "standard SGD (no DP)" if dp is None else (
            f"DP-SGD: sigma={noise_multiplier:.6g}, C={config.max_per_sample_grad_norm}, "
            f"q={engine.sample_rate:.6g}, {engine.steps_per_epoch} steps/epoch, {config.accountant} accountant")
        verb = f"Resuming at epoch {start_epoch}:" if resume is not None else "Training"
        print(f"{verb} SampleConvNet on {len(train_data)} MNIST images on {device} with {mode}; "
              f"run folder {run_dir.path}", flush=True)

    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        if stop_reason is not None:
            break
        epoch_start = time.perf_counter()
        outcome = train(engine, ledger, epoch, config, noise_multiplier, hook)
        stop_reason = outcome.stop_reason
        if outcome.result is None:  # not one step fits in the budget: no epoch to report
            break
        result = outcome.result
        epsilons = epsilon_columns(ledger, delta=config.delta, dp=dp is not None)
        epsilon = epsilons[f"epsilon_{config.accountant}"]
        test_accuracy = test(engine.model, test_data, config, device)
        seconds = time.perf_counter() - epoch_start
        rows.append({"Epoch": epoch, "Train Accuracy": result.accuracy, "Test Accuracy": test_accuracy,
                     "Epsilon": epsilon, "Delta": config.delta})
        metric_rows.append({
            "epoch": epoch, "steps": ledger.steps if dp else epoch * engine.steps_per_epoch,
            "sample_rate": engine.sample_rate, "noise_multiplier": noise_multiplier if dp else 0.0,
            "max_grad_norm": config.max_per_sample_grad_norm if dp else math.inf,
            "train_loss": result.loss, "train_accuracy": result.accuracy, "test_accuracy": test_accuracy,
            "epsilon": epsilon, "delta": config.delta, "seconds": round(seconds, 3),
            "accountant": config.accountant, **epsilons,
        })
        # Checkpoint first, then write and print: nothing about an epoch is released
        # before the state that produced it is saved (see docs/privacy.md).
        checkpointer.save(engine=engine, ledger=ledger, epoch=epoch, steps=ledger.steps,
                          extra={"rows": rows, "metrics": metric_rows, "stop_reason": stop_reason})
        atomic_write_text(csv_path, csv_text(SEED_CSV_COLUMNS, rows))
        run_dir.append_metrics(metric_rows[-1])
        if not config.quiet:
            print(f"Epoch {epoch:3d} | train acc {result.accuracy:.4f} | test acc {test_accuracy:.4f} | "
                  f"ε = {epsilon:.4f} (δ = {config.delta:g}, {config.accountant}) | {seconds:.1f}s", flush=True)
        if hook:
            hook("epoch", epoch)
    if stop_reason is not None and not config.quiet:
        print(f"Stopped early: {stop_reason}", flush=True)

    run_dir.save_model(engine.model)
    epsilons = epsilon_columns(ledger, delta=config.delta, dp=dp is not None)
    steps = ledger.steps if dp else len(rows) * engine.steps_per_epoch
    summary = {
        "job": "mnist", "epochs": config.epochs, "epochs_completed": len(rows), "steps": steps,
        "train_accuracy": rows[-1]["Train Accuracy"] if rows else math.nan,
        "test_accuracy": rows[-1]["Test Accuracy"] if rows else math.nan,
        "epsilon": epsilons[f"epsilon_{config.accountant}"], "accountant": config.accountant,
        "epsilons": {name: epsilons[f"epsilon_{name}"] for name in ACCOUNTANTS},
        "delta": config.delta, "noise_multiplier": noise_multiplier if dp else 0.0,
        "target_epsilon": config.epsilon if config.epsilon_is_target else None,
        "max_epsilon": config.max_epsilon, "stopped_early": stop_reason is not None, "stop_reason": stop_reason,
        "resumed": resume is not None,
        "sample_rate": engine.sample_rate, "dp": dp is not None, "engine": engine.name,
        "device": str(device), "versions": library_versions(), "csv": str(csv_path),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    run_dir.write_summary(summary)
    return summary

"""Train the small CelebA CNN on a preprocessed folder: the non-private baseline or DP-SGD.

Reads top to bottom like Opacus's examples: :func:`train` runs one epoch,
:func:`evaluate_split` measures loss and accuracy on a split, :func:`run` ties
them together and writes the run folder. The baseline is the *same* config with
``mode="baseline"``: the engine gets ``dp=None`` and trains on shuffled batches
of the same size; everything else (model, optimizer, epochs, evaluation) is
shared. DP goes through exactly the code path of :mod:`dpvision.mnist`: Poisson
sampling at rate q = 1/ceil(N/B), per-example clipping to C, Gaussian noise σC,
every step recorded in a :class:`~dpvision.privacy.accounting.PrivacyLedger`,
ε under every accountant after every epoch.

Run folder ``<runs-dir>/celeba_<mode>/<run-name>/``::

    config.yaml      the resolved settings (σ, q, δ, data fingerprint, device, engine)
    metrics.csv      one row per epoch: train/val loss and accuracy, ε (rdp, prv, pld), seconds
    model_best.pt    weights of the epoch with the best validation accuracy
    model.pt         weights after the last epoch
    summary.json     test accuracy of model_best.pt overall, per class and per stratum; ε, δ, σ, q, steps
    curves.png       accuracy and ε per epoch
    checkpoint.pt    everything needed by ``--resume``

Choosing the best epoch on the validation split *uses* the validation set, and
DP-SGD's guarantee covers only the training set: the validation images (like
the test images) get no protection, and the choice of epoch is not itself
private. Report it, or use the last epoch (``model.pt``, ``test_accuracy_last``)
when validation data must stay private too.

Example:
    >>> from dpvision.celeba.train import CelebaTrainConfig, run
    >>> summary = run(CelebaTrainConfig(data="data/celeba/preprocessed/eyeglasses_64", mode="dp",
    ...                                 epochs=2, quiet=True))                       # doctest: +SKIP
    >>> summary["test_accuracy"], summary["epsilon"]                                 # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from dpvision.cli_support import check_can_create_dir, resolve_device

SPLIT_FILES = ("train.pt", "val.pt", "test.pt")
STATS_FILE = "stats.json"
MODES = ("baseline", "dp")
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("sgd", "adam")
ENGINE_NAMES = ("fast", "opacus")
ACCOUNTANT_NAMES = ("rdp", "prv", "pld")
DEFAULT_SIGMA = 1.0  # under --mode dp when neither --sigma nor --target-epsilon is given
DEFAULT_LR = {"baseline": 0.05, "dp": 0.1}  # measured on the 20,000-image demo archive (README)
BEST_MODEL = "model_best.pt"
CURVES = "curves.png"
JOB = "celeba_train"
# Config keys that cannot change the result: a resumed run may set them anew.
RESUME_FREE_KEYS = ("data", "device", "device_resolved", "quiet", "runs_dir", "run_name")
RESUME_FLAGS = ("--resume", "--data", "--device", "--quiet")
SUMMARY_KEYS = (  # the fields the issue asks for; summary.json has more
    "test_accuracy", "epsilon", "delta", "noise_multiplier", "sample_rate", "steps",
    "test_accuracy_per_class", "test_accuracy_per_stratum",
)


def _metric_columns() -> list[str]:
    from dpvision.jobs.loop import EPSILON_COLUMNS

    return ["epoch", "steps", "sample_rate", "noise_multiplier", "max_grad_norm", "train_loss", "train_accuracy",
            "val_loss", "val_accuracy", "epsilon", "delta", "seconds", "accountant", *EPSILON_COLUMNS]


def data_fingerprint(data: str | os.PathLike) -> dict[str, Any]:
    """Identity of a preprocessed folder (its stats.json: subset index hash, size, counts, mean/std)."""
    text = (Path(data) / STATS_FILE).read_text()
    stats = json.loads(text)
    return {"stats_sha256": hashlib.sha256(text.encode()).hexdigest(), "size": stats.get("size"),
            "counts": stats.get("counts"), "class_names": stats.get("class_names")}


def check_data_dir(data: str | os.PathLike | None, flag: str = "--data") -> dict:
    """The folder's ``stats.json`` as a dict, or ``ValueError`` naming ``flag``."""
    if data is None or str(data) == "":
        raise ValueError(f"{flag} is required: a folder made by celeba_preprocess.py")
    path = Path(data)
    if not path.is_dir():
        raise ValueError(f"{flag} must be a folder made by celeba_preprocess.py, got {str(data)!r} (not a directory)")
    missing = [name for name in (STATS_FILE, *SPLIT_FILES) if not (path / name).is_file()]
    if missing:
        raise ValueError(f"{flag} {str(data)!r} is not a preprocessed folder: missing {', '.join(missing)} "
                         "(run celeba_preprocess.py first)")
    try:
        stats = json.loads((path / STATS_FILE).read_text())
        counts = {split: int(stats["counts"][split]) for split in ("train", "val", "test")}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{flag} {str(data)!r}: unreadable {STATS_FILE} ({err})") from None
    if counts["train"] < 1 or counts["val"] < 1 or counts["test"] < 1:
        raise ValueError(f"{flag} {str(data)!r} needs images in train, val and test, has {counts}")
    return stats


@dataclass(kw_only=True)
class CelebaTrainConfig:
    """Every setting of ``celeba_train.py``; field names follow the flags (``--max-grad-norm`` -> max_grad_norm).

    Defaults (chosen on the demo archive, see the README): 10 epochs, expected
    batch 256, SGD with momentum 0.9 at lr 0.05 (baseline) or 0.1 (DP: clipped gradients are smaller),
    CelebaCNN of width 16, C = 1,
    σ = 1 unless ``target_epsilon`` is given, δ = 1/(10 N) ("auto").
    """

    data: str
    mode: str = "dp"
    epochs: int = 10
    batch_size: int = 256
    eval_batch_size: int = 512
    lr: float | None = None  # None: DEFAULT_LR[mode] (DP's clipped gradients are smaller: a larger step)
    optimizer: str = "sgd"
    momentum: float = 0.9  # SGD only
    sigma: float | None = None  # None: DEFAULT_SIGMA under DP, unless target_epsilon is given
    target_epsilon: float | None = None  # σ is calibrated so the whole run ends at this ε
    max_grad_norm: float = 1.0
    delta: float | str = "auto"  # "auto": 1 / (10 N_train), resolved here
    seed: int = 0
    device: str = "auto"
    engine: str = "fast"
    accountant: str = "rdp"  # the ε reported, calibrated to and budgeted; metrics.csv has all three
    max_epsilon: float | None = None  # budget: stop before the first step that would exceed it
    width: int = 16  # channels of the first conv block of CelebaCNN
    runs_dir: str = "runs"
    run_name: str | None = None
    quiet: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, flag: str, valid: str, value) -> None:
            if not ok:
                raise ValueError(f"{flag} must be {valid}, got {value!r}")

        def finite(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(self.mode in MODES, "--mode", f"one of {', '.join(MODES)}", self.mode)
        if self.sigma is not None:
            need(finite(self.sigma) and self.sigma >= 0, "--sigma", "a number >= 0", self.sigma)
        if self.target_epsilon is not None:
            need(finite(self.target_epsilon) and self.target_epsilon > 0, "--target-epsilon", "a positive number",
                 self.target_epsilon)
        if self.max_epsilon is not None:
            need(finite(self.max_epsilon) and self.max_epsilon > 0, "--max-epsilon", "a positive number",
                 self.max_epsilon)
        if self.sigma is not None and self.target_epsilon is not None:
            raise ValueError("--sigma and --target-epsilon exclude each other: --target-epsilon calibrates sigma; "
                             "give one of them")
        if self.mode == "baseline":
            for flag, value in (("--sigma", self.sigma), ("--target-epsilon", self.target_epsilon),
                                ("--max-epsilon", self.max_epsilon)):
                if value is not None:
                    raise ValueError(f"{flag} needs --mode dp (the baseline adds no noise and spends no privacy)")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        stats = check_data_dir(self.data)
        n_train = int(stats["counts"]["train"])
        if isinstance(self.delta, str):
            if self.delta.strip().lower() == "auto":
                self.delta = 1.0 / (10 * n_train)
            else:
                try:
                    self.delta = float(self.delta)
                except ValueError:
                    raise ValueError(f"--delta must be a number in (0, 1) or 'auto', got {self.delta!r}") from None
        need(isinstance(self.epochs, int) and self.epochs >= 1, "--epochs", "a positive integer", self.epochs)
        need(isinstance(self.batch_size, int) and 1 <= self.batch_size <= n_train, "--batch-size",
             f"an integer between 1 and the {n_train} training images", self.batch_size)
        need(isinstance(self.eval_batch_size, int) and self.eval_batch_size >= 1, "--eval-batch-size",
             "a positive integer", self.eval_batch_size)
        need(finite(self.lr) and self.lr > 0, "--lr", "a positive number", self.lr)
        need(self.optimizer in OPTIMIZERS, "--optimizer", f"one of {', '.join(OPTIMIZERS)}", self.optimizer)
        need(finite(self.momentum) and 0 <= self.momentum < 1, "--momentum", "in [0, 1)", self.momentum)
        need(finite(self.max_grad_norm) and self.max_grad_norm > 0, "--max-grad-norm", "a positive number",
             self.max_grad_norm)
        need(finite(self.delta) and 0 < self.delta < 1, "--delta", "a number in (0, 1) or 'auto'", self.delta)
        need(self.device in DEVICES, "--device", f"one of {', '.join(DEVICES)}", self.device)
        need(self.engine in ENGINE_NAMES, "--engine", f"one of {', '.join(ENGINE_NAMES)}", self.engine)
        need(self.accountant in ACCOUNTANT_NAMES, "--accountant", f"one of {', '.join(ACCOUNTANT_NAMES)}",
             self.accountant)
        need(isinstance(self.width, int) and self.width >= 8 and self.width % 8 == 0, "--width",
             "a positive multiple of 8 (GroupNorm uses 8 groups)", self.width)
        need(isinstance(self.seed, int), "--seed", "an integer", self.seed)
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("--device must be cpu or auto on this machine (no CUDA device is available), "
                                 "got 'cuda'")

    @property
    def dp(self) -> bool:
        return self.mode == "dp"

    def num_train(self) -> int:
        return int(check_data_dir(self.data)["counts"]["train"])

    @property
    def sample_rate(self) -> float:
        from dpvision.privacy.accounting import poisson_sample_rate

        return poisson_sample_rate(self.num_train(), self.batch_size)

    @property
    def total_steps(self) -> int:
        from dpvision.privacy.accounting import steps_per_epoch

        return self.epochs * steps_per_epoch(self.sample_rate)


def resolve_noise_multiplier(config: CelebaTrainConfig) -> float:
    """σ actually used: 0 for the baseline, ``sigma``, or calibrated so the run ends at ``target_epsilon``."""
    if not config.dp:
        return 0.0
    if config.target_epsilon is None:
        return DEFAULT_SIGMA if config.sigma is None else float(config.sigma)
    from dpvision.privacy.accounting import calibrate_noise_multiplier

    try:
        return calibrate_noise_multiplier(target_epsilon=config.target_epsilon, delta=config.delta,
                                          sample_rate=config.sample_rate, steps=config.total_steps,
                                          accountant=config.accountant)
    except ValueError as err:
        raise ValueError(f"--target-epsilon: {err}") from None


def validate(config: CelebaTrainConfig) -> float:
    """Every check that can fail before anything is written; returns σ."""
    noise_multiplier = resolve_noise_multiplier(config)
    check_can_create_dir(config.runs_dir, "--runs-dir")
    if config.dp and config.delta >= 1 / config.num_train():
        warnings.warn(f"--delta {config.delta} is at least 1/N = 1/{config.num_train()}: too large to be a "
                      "meaningful privacy guarantee (use delta << 1/N, e.g. --delta auto)", stacklevel=2)
    return noise_multiplier


def default_run_name(config: CelebaTrainConfig, noise_multiplier: float) -> str:
    name = f"{config.optimizer}_lr{config.lr:g}_b{config.batch_size}_e{config.epochs}_seed{config.seed}"
    if config.dp:
        name += f"_sigma{noise_multiplier:.4g}_C{config.max_grad_norm:g}"
    return name


def group_accuracy(predictions, labels, groups: Sequence[str]) -> tuple[dict[str, float], dict[str, int]]:
    """Accuracy and count per group (class name or stratum) of the examples ``groups`` labels.

    Example:
        >>> import torch
        >>> group_accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]), ["a", "a", "b"])
        ({'a': 0.5, 'b': 1.0}, {'a': 2, 'b': 1})
    """
    correct = (predictions == labels).tolist()
    totals: dict[str, int] = {}
    hits: dict[str, int] = {}
    for group, ok in zip(groups, correct):
        totals[group] = totals.get(group, 0) + 1
        hits[group] = hits.get(group, 0) + int(ok)
    keys = sorted(totals)
    return {g: hits[g] / totals[g] for g in keys}, {g: totals[g] for g in keys}


def train(engine, ledger, epoch: int, config: CelebaTrainConfig, noise_multiplier: float,
          hook: Callable[[str, int], None] | None = None):
    """One epoch behind a progress bar over steps, cut short by ``--max-epsilon`` if it must be."""
    from tqdm import tqdm

    from dpvision.privacy.budget import PrivacyBudget
    from dpvision.jobs.loop import train_private_epoch

    budget = None
    if config.dp and config.max_epsilon is not None:
        budget = PrivacyBudget(max_epsilon=config.max_epsilon, delta=config.delta, accountant=config.accountant)
    with tqdm(total=engine.steps_per_epoch, desc=f"Epoch {epoch}", unit="step", leave=False,
              disable=config.quiet, file=sys.stderr) as bar:
        def progress(steps: int) -> None:
            bar.update(steps)
            if hook:
                hook("step", bar.n)

        return train_private_epoch(engine, ledger, noise_multiplier=noise_multiplier, budget=budget,
                                   progress=progress)


def evaluate_split(model, data, config: CelebaTrainConfig, device) -> tuple[float, float, Any]:
    """Mean loss, accuracy and predictions of ``model`` on one split."""
    from dpvision.engines import evaluate

    return evaluate(model, data, batch_size=config.eval_batch_size, device=device)


def load_resume_config(run_path: str | os.PathLike, **overrides) -> tuple[CelebaTrainConfig, dict]:
    """The config of the run in ``run_path`` with ``overrides`` of resume-free keys; and the saved config."""
    from dpvision.runs import RunDir

    run_dir = RunDir(run_path)
    if not (run_dir.path / RunDir.CONFIG).is_file():
        raise ValueError(f"--resume must be a run folder holding {RunDir.CONFIG}, got {str(run_path)!r}")
    saved = run_dir.read_config()
    if not isinstance(saved, dict) or saved.get("job") != JOB or "noise_multiplier" not in saved:
        raise ValueError(f"--resume must be a CelebA training run folder, got {str(run_path)!r}")
    bad = set(overrides) - set(RESUME_FREE_KEYS)
    if bad:
        raise ValueError(f"cannot override {sorted(bad)} when resuming")
    names = {f.name for f in fields(CelebaTrainConfig)}
    values = {k: v for k, v in saved.items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = CelebaTrainConfig(**values)
    if data_fingerprint(config.data) != saved.get("data_fingerprint"):
        raise ValueError(f"--data {config.data!r} is not the data the run in {str(run_path)!r} was trained on "
                         "(its stats.json differs)")
    return config, saved


def run(config: CelebaTrainConfig, *, resume: str | os.PathLike | None = None,
        hook: Callable[[str, int], None] | None = None) -> dict:
    """Train, write the run folder after every epoch, evaluate the best model on test; return the summary.

    ``resume`` continues the run folder it names (``config`` then comes from
    :func:`load_resume_config`). ``hook(event, n)`` is called after every step
    (``"step"``) and after every epoch's files are written (``"epoch"``): tests
    raise from it to simulate an interruption.
    """
    from opacus.validators import ModuleValidator

    from dpvision.celeba.plots import plot_curves
    from dpvision.celeba.preprocessing import load_split
    from dpvision.models import CelebaCNN
    from dpvision.privacy.accounting import ACCOUNTANTS, PrivacyLedger
    from dpvision.runs import RunDir, atomic_torch_save, library_versions
    from dpvision.seeding import seed_everything
    from dpvision.engines import DPSettings, OptimizerSpec, build_engine
    from dpvision.jobs.loop import Checkpointer, epsilon_columns

    metric_columns = _metric_columns()
    if resume is None:
        noise_multiplier = validate(config)
    else:  # σ exactly as the run used it
        noise_multiplier = float(RunDir(resume).read_config()["noise_multiplier"])
    device = resolve_device(config.device)
    dp = DPSettings(noise_multiplier=noise_multiplier, max_grad_norm=config.max_grad_norm) if config.dp else None

    seed_everything(config.seed)
    train_data, train_meta = load_split(config.data, "train")
    val_data, _ = load_split(config.data, "val")
    test_data, test_meta = load_split(config.data, "test")
    class_names = list(train_meta["class_names"])

    model = CelebaCNN(num_classes=len(class_names), width=config.width)
    ModuleValidator.validate(model, strict=True)  # no BatchNorm or other cross-example layer: DP-compatible
    optimizer = OptimizerSpec(name=config.optimizer, lr=config.lr,
                              momentum=config.momentum if config.optimizer == "sgd" else 0.0)
    engine = build_engine(config.engine, model=model, train_data=train_data, batch_size=config.batch_size,
                          optimizer=optimizer, dp=dp, seed=config.seed, device=device)
    ledger = PrivacyLedger()

    if resume is None:
        run_dir = RunDir.create(config.runs_dir, f"celeba_{config.mode}",
                                config.run_name or default_run_name(config, noise_multiplier), metric_columns)
        run_dir.write_config({
            "job": JOB, **asdict(config), "noise_multiplier": noise_multiplier,
            "sample_rate": engine.sample_rate, "steps_per_epoch": engine.steps_per_epoch,
            "num_train": len(train_data), "num_val": len(val_data), "num_test": len(test_data),
            "class_names": class_names, "data_fingerprint": data_fingerprint(config.data),
            "device_resolved": str(device), "engine": engine.name,
        })
    else:
        run_dir = RunDir(resume, metric_columns)
    checkpointer = Checkpointer(run_dir.path, run_dir.read_config(), ignore=RESUME_FREE_KEYS)
    state = checkpointer.restore(engine, ledger) if resume is not None else None
    extra = state["extra"] if state else {}
    metric_rows: list[dict] = list(extra.get("metrics", []))
    stop_reason: str | None = extra.get("stop_reason")
    best_epoch: int = int(extra.get("best_epoch", 0))
    best_val_accuracy: float = float(extra.get("best_val_accuracy", -math.inf))
    best_state: dict | None = extra.get("best_state")
    start_epoch = state["epoch"] + 1 if state else 1
    if resume is not None:  # the folder holds exactly the checkpointed epochs
        run_dir.rewrite_metrics(metric_rows)
        if best_state is not None:
            atomic_torch_save(best_state, run_dir.path / BEST_MODEL)

    if not config.quiet:
        what = "no DP (baseline)" if dp is None else (
            f"DP-SGD: sigma={noise_multiplier:.6g}, C={config.max_grad_norm:g}, q={engine.sample_rate:.6g}, "
            f"{engine.steps_per_epoch} steps/epoch, delta={config.delta:.3g}, {config.accountant} accountant")
        verb = f"Resuming at epoch {start_epoch}:" if resume is not None else "Training"
        print(f"{verb} CelebaCNN on {len(train_data)} images ({'/'.join(class_names)}) on {device} "
              f"[{engine.name} engine] with {what}; run folder {run_dir.path}", flush=True)

    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        if stop_reason is not None:
            break
        epoch_start = time.perf_counter()
        outcome = train(engine, ledger, epoch, config, noise_multiplier, hook)
        stop_reason = outcome.stop_reason
        if outcome.result is None:  # not one step fits in the budget
            break
        result = outcome.result
        epsilons = epsilon_columns(ledger, delta=config.delta, dp=dp is not None)
        epsilon = epsilons[f"epsilon_{config.accountant}"]
        val_loss, val_accuracy, _ = evaluate_split(engine.model, val_data, config, device)
        seconds = time.perf_counter() - epoch_start
        improved = val_accuracy > best_val_accuracy
        if improved:
            best_epoch, best_val_accuracy = epoch, val_accuracy
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in engine.model.state_dict().items()}
        metric_rows.append({
            "epoch": epoch, "steps": ledger.steps if dp else epoch * engine.steps_per_epoch,
            "sample_rate": engine.sample_rate, "noise_multiplier": noise_multiplier,
            "max_grad_norm": config.max_grad_norm if dp else math.inf,
            "train_loss": result.loss, "train_accuracy": result.accuracy,
            "val_loss": val_loss, "val_accuracy": val_accuracy, "epsilon": epsilon, "delta": config.delta,
            "seconds": round(seconds, 3), "accountant": config.accountant, **epsilons,
        })
        # Checkpoint first, then write and print (nothing about an epoch is released before its state is saved).
        checkpointer.save(engine=engine, ledger=ledger, epoch=epoch, steps=ledger.steps, extra={
            "metrics": metric_rows, "stop_reason": stop_reason, "best_epoch": best_epoch,
            "best_val_accuracy": best_val_accuracy, "best_state": best_state})
        if improved:
            atomic_torch_save(best_state, run_dir.path / BEST_MODEL)
        run_dir.append_metrics(metric_rows[-1])
        if not config.quiet:
            eps_text = f"ε = {epsilon:.4f} (δ = {config.delta:.3g}, {config.accountant})" if dp else "ε = ∞ (no DP)"
            print(f"Epoch {epoch:3d} | train loss {result.loss:.4f} acc {result.accuracy:.4f} | "
                  f"val loss {val_loss:.4f} acc {val_accuracy:.4f}{' *' if improved else '  '} | {eps_text} | "
                  f"{seconds:.1f}s", flush=True)
        if hook:
            hook("epoch", epoch)
    if stop_reason is not None and not config.quiet:
        print(f"Stopped early: {stop_reason}", flush=True)

    run_dir.save_model(engine.model)  # model.pt: the last epoch
    if best_state is None:  # not a single epoch ran (budget): the initial model is all there is
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in engine.model.state_dict().items()}
        atomic_torch_save(best_state, run_dir.path / BEST_MODEL)
    _, test_accuracy_last, _ = evaluate_split(engine.model, test_data, config, device)
    best_model = CelebaCNN(num_classes=len(class_names), width=config.width).to(device)
    best_model.load_state_dict(best_state)
    test_loss, test_accuracy, predictions = evaluate_split(best_model, test_data, config, device)
    labels = test_data.labels
    per_class, class_counts = group_accuracy(predictions, labels, [class_names[int(y)] for y in labels])
    per_stratum, stratum_counts = group_accuracy(predictions, labels, list(test_meta["strata"]))

    epsilons = epsilon_columns(ledger, delta=config.delta, dp=dp is not None)
    steps = ledger.steps if dp else len(metric_rows) * engine.steps_per_epoch
    summary = {
        "job": JOB, "mode": config.mode, "dp": dp is not None,
        "test_accuracy": test_accuracy, "test_loss": test_loss,
        "test_accuracy_per_class": per_class, "test_count_per_class": class_counts,
        "test_accuracy_per_stratum": per_stratum, "test_count_per_stratum": stratum_counts,
        "test_accuracy_last": test_accuracy_last, "best_epoch": best_epoch,
        "best_val_accuracy": best_val_accuracy if best_epoch else math.nan,
        "epsilon": epsilons[f"epsilon_{config.accountant}"], "accountant": config.accountant,
        "epsilons": {name: epsilons[f"epsilon_{name}"] for name in ACCOUNTANTS},
        "delta": config.delta, "noise_multiplier": noise_multiplier,
        "max_grad_norm": config.max_grad_norm if dp else math.inf,
        "sample_rate": engine.sample_rate, "steps": steps, "steps_per_epoch": engine.steps_per_epoch,
        "epochs": config.epochs, "epochs_completed": len(metric_rows),
        "target_epsilon": config.target_epsilon, "max_epsilon": config.max_epsilon,
        "stopped_early": stop_reason is not None, "stop_reason": stop_reason, "resumed": resume is not None,
        "num_train": len(train_data), "num_val": len(val_data), "num_test": len(test_data),
        "class_names": class_names, "engine": engine.name, "device": str(device),
        "seconds_per_epoch": (sum(float(r["seconds"]) for r in metric_rows) / len(metric_rows)
                              if metric_rows else math.nan),
        "wall_seconds": round(time.perf_counter() - started, 3), "versions": library_versions(),
        "selection_note": "model_best.pt is chosen on the validation split, which DP-SGD does not protect",
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    title = (f"CelebA {config.mode}: " + (f"σ={noise_multiplier:.3g}, C={config.max_grad_norm:g}, "
                                           f"q={engine.sample_rate:.3g}, δ={config.delta:.2g}" if dp else "no DP"))
    plot_curves(metric_rows, run_dir.path / CURVES, title=title)
    run_dir.write_summary(summary)
    if not config.quiet:
        eps_text = f"ε = {summary['epsilon']:.4f} at δ = {config.delta:.3g}" if dp else "no DP"
        print(f"Test accuracy {test_accuracy:.4f} (best epoch {best_epoch} on validation; last epoch "
              f"{test_accuracy_last:.4f}) | {eps_text} | per stratum "
              + ", ".join(f"{k}: {v:.3f}" for k, v in per_stratum.items()), flush=True)
    return summary


# ----------------------------------------------------------------------------- command line

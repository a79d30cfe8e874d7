"""What a run tells people: the metrics row, the per-epoch line, the closing lines, ``summary.json``, TensorBoard.

A ``metrics.csv`` row is the union of the epoch's metric dicts (:func:`split_metrics` per split,
:func:`plan_columns`, :func:`privacy_columns`), put in :data:`METRIC_COLUMNS` order by
:func:`metrics_row`; ``summary.json`` is the union of :func:`setting_summary`,
:func:`privacy_summary`, :func:`progress_summary` and the test results.

Example:
    >>> import torch
    >>> group_accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]), ["a", "a", "b"])
    {'a': {'accuracy': 0.5, 'count': 2}, 'b': {'accuracy': 1.0, 'count': 1}}
    >>> split_metrics("val", 0.5, 0.75)
    {'val_loss': 0.5, 'val_accuracy': 0.75}
"""

from __future__ import annotations

import math
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from dpvision.jobs.loop import EPSILON_COLUMNS
from dpvision.privacy.accounting import ACCOUNTANTS
from dpvision.runs import library_versions

SPLITS = ("train", "val", "test")
PLAN_COLUMNS = ("sample_rate", "noise_multiplier", "max_grad_norm")
# The one definition of metrics.csv's columns and their order (the seed CSVs are derived from these rows).
METRIC_COLUMNS = ["epoch", "steps", *PLAN_COLUMNS, *(f"{s}_{m}" for s in SPLITS for m in ("loss", "accuracy")),
                  "epsilon", "delta", "seconds", "accountant", *EPSILON_COLUMNS]
SELECTION_NOTE = ("the test set judges the weights of the best validation epoch; DP-SGD protects the training "
                  "set only, so the validation images and this choice are not private")


def split_metrics(split: str, loss: float, accuracy: float) -> dict[str, float]:
    """``{"<split>_loss": loss, "<split>_accuracy": accuracy}`` (NaN for a split not measured)."""
    return {f"{split}_loss": loss, f"{split}_accuracy": accuracy}


def plan_columns(plan) -> dict[str, float]:
    """q, σ and C of the run's plan, as every row records them."""
    return {name: getattr(plan, name) for name in PLAN_COLUMNS}


def privacy_columns(epsilons: Mapping[str, float], *, accountant: str, delta: float) -> dict[str, Any]:
    """ε under the primary accountant, δ, the accountant's name and ε under every rigorous accountant.

    ``epsilons`` may hold an approximate primary (``epsilon_gdp``): it is the row's ``epsilon`` but has
    no column of its own (only proven bounds do, :data:`EPSILON_COLUMNS`).
    """
    return {"epsilon": epsilons[f"epsilon_{accountant}"], "delta": delta, "accountant": accountant,
            **{column: epsilons[column] for column in EPSILON_COLUMNS}}


def metrics_row(*parts: Mapping[str, Any]) -> dict[str, Any]:
    """One ``metrics.csv`` row from the epoch's metric dicts, in :data:`METRIC_COLUMNS` order.

    ``ValueError`` when the dicts miss a column or bring one the file does not have.
    """
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    if set(merged) != set(METRIC_COLUMNS):
        raise ValueError(f"metrics row: missing {sorted(set(METRIC_COLUMNS) - set(merged))}, "
                         f"unknown {sorted(set(merged) - set(METRIC_COLUMNS))}")
    return {column: merged[column] for column in METRIC_COLUMNS}


def group_accuracy(predictions, labels, groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{group: {"accuracy": a, "count": n}}`` for the examples that ``groups`` labels, sorted by group."""
    correct = (predictions == labels).tolist()
    totals: dict[str, list[int]] = {}
    for group, ok in zip(groups, correct):
        hits = totals.setdefault(group, [0, 0])
        hits[0] += int(ok)
        hits[1] += 1
    return {g: {"accuracy": hits / n, "count": n} for g, (hits, n) in sorted(totals.items())}


def start_line(config, plan, *, engine: str, device: str, path: str, resumed_at: int | None) -> str:
    """``Training <model> on <N> <dataset> images on <device> [<engine> engine] with <DP or not>; run folder ...``."""
    mode = "no DP (baseline)" if not plan.dp else (
        f"DP-SGD: sigma={plan.noise_multiplier:.6g}, C={plan.max_grad_norm:g}, q={plan.sample_rate:.6g}, "
        f"{plan.steps_per_epoch} steps/epoch, delta={plan.delta:.3g}, {config.dp.accountant} accountant"
        + "".join(f"; input statistics released first (sigma={sigma:g}, {n} Gaussian releases, in epsilon)"
                  for sigma, _, n in plan.releases))
    if config.optim.objective == "contrastive":
        mode = ("no DP, the contrastive objective (accuracy: the share of views whose nearest other view in the "
                "batch is their partner)")
    verb = "Training" if resumed_at is None else f"Resuming at epoch {resumed_at}:"
    return (f"{verb} {config.model.name} on {plan.num_train} {config.data.dataset} images on {device} "
            f"[{engine} engine] with {mode}; run folder {path}")


def complete_line(path: str, epochs: int, stop_reason: str | None) -> str:
    """What a resume of a finished run says instead of training."""
    stopped = f"; stopped early: {stop_reason}" if stop_reason else ""
    return f"Run {path} is already complete ({epochs} epochs{stopped}): nothing to train"


def paused_line(paused: Mapping[str, Any]) -> str:
    """What a sitting that ``run.max_minutes`` ended says instead of the closing lines."""
    spent = f", ε so far {paused['epsilon']:.4f}" if paused["dp"] else ""
    return (f"Paused after epoch {paused['epoch']} of {paused['epochs']} (max {paused['max_minutes']:g} minutes"
            f"{spent}); the checkpoint is saved: --resume {shlex.quote(str(paused['run_dir']))} continues")


def curves_title(config, plan) -> str:
    """``curves.png``'s title: dataset, model and the plan's σ, C, q, δ (or "no DP")."""
    return f"{config.data.dataset} / {config.model.name}: " + (
        f"σ={plan.noise_multiplier:.3g}, C={plan.max_grad_norm:g}, q={plan.sample_rate:.3g}, δ={plan.delta:.2g}"
        if plan.dp else "no DP")


def epoch_line(row: Mapping[str, Any], *, improved: bool, dp: bool) -> str:
    """``Epoch   3 | train loss ... acc ... | val ... | test acc ... | ε = ... (δ = ..., rdp) | 1.2s``."""
    parts = [f"Epoch {int(row['epoch']):3d}", f"train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}"]
    if not math.isnan(row["val_accuracy"]):
        parts.append(f"val acc {row['val_accuracy']:.4f}{' *' if improved else ''}")
    if not math.isnan(row["test_accuracy"]):
        parts.append(f"test acc {row['test_accuracy']:.4f}")
    parts.append(f"ε = {row['epsilon']:.4f} (δ = {row['delta']:.3g}, {row['accountant']})" if dp else "ε = ∞ (no DP)")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


def final_line(summary: Mapping[str, Any], outputs: Sequence[str]) -> str:
    """The closing lines of every job: accuracy, ε under every accountant, wall time, and the run folder
    with the ``outputs`` it holds."""
    if summary["dp"]:
        others = ", ".join(f"{name} {summary['epsilons'][name]:.4f}" for name in ACCOUNTANTS
                           if name != summary["accountant"])
        privacy = (f"ε = {summary['epsilon']:.4f} ({summary['accountant']}; {others}) at δ = {summary['delta']:.3g}"
                   f" after {summary['steps']} steps")
    else:
        privacy = "no DP (ε = ∞)"
    chosen = f" (best validation epoch {summary['best_epoch']})" if summary.get("test_accuracy_last") is not None \
        else ""
    measure = "pair accuracy" if summary.get("objective") == "contrastive" else "accuracy"
    judged = (f"test {measure} {summary['test_accuracy']:.4f}{chosen}" if not math.isnan(summary["test_accuracy"])
              else f"validation {measure} {summary['val_accuracy']:.4f} (test set not evaluated)")
    return (f"Done in {summary['wall_seconds']:.1f}s: {judged} | {privacy}\n"
            f"Outputs: {summary['run_dir']}/ ({', '.join(outputs)})")


def summary_of_test(loss: float, accuracy: float, per_class: Mapping | None, per_group: Mapping | None) -> dict:
    """The test set's loss and accuracy, overall and per class and group (``{name: accuracy}``, ``{name: count}``)."""
    def split(groups, key):
        return None if groups is None else {g: v[key] for g, v in groups.items()}

    return {"test_loss": loss, "test_accuracy": accuracy,
            "test_accuracy_per_class": split(per_class, "accuracy"), "test_count_per_class": split(per_class, "count"),
            "test_accuracy_per_group": split(per_group, "accuracy"), "test_count_per_group": split(per_group, "count")}


def setting_summary(config, plan, data, *, engine: str, device) -> dict[str, Any]:
    """What ran: dataset, model, data sizes, engine, device, seed, library versions."""
    return {"dataset": config.data.dataset, "model": config.model.name, "dp": plan.dp, "num_train": plan.num_train,
            "num_val": len(data.val) if data.val is not None else 0, "num_test": len(data.test),
            "class_names": list(data.class_names), "engine": engine, "device": str(device),
            "seed": config.run.seed, "versions": library_versions(),
            # the contrastive objective's "accuracy" is its pair accuracy (dpvision.engines.contrastive)
            **({"objective": "contrastive"} if config.optim.objective == "contrastive" else {})}


def privacy_summary(config, plan, epsilons: Mapping[str, float], *, steps: int) -> dict[str, Any]:
    """ε under every accountant after ``steps`` steps, and the plan's σ, C, q, δ (with the targets asked for)."""
    accountant = config.dp.accountant
    return {"epsilon": epsilons[f"epsilon_{accountant}"], "accountant": accountant,
            "epsilons": {name: epsilons[f"epsilon_{name}"] for name in ACCOUNTANTS}, "delta": plan.delta,
            "noise_multiplier": plan.noise_multiplier, "max_grad_norm": plan.max_grad_norm,
            "sample_rate": plan.sample_rate, "steps": steps, "steps_per_epoch": plan.steps_per_epoch,
            "target_epsilon": config.dp.target_epsilon, "max_epsilon": config.dp.max_epsilon,
            # what was released before training (the private input normalisation's (σ_norm, 1, 2)), in ε above
            **({"releases": [list(entry) for entry in plan.releases]} if plan.releases else {})}


def progress_summary(config, rows: Sequence[Mapping[str, Any]], *, stop_reason: str | None, resumed: bool,
                     wall_seconds: float) -> dict[str, Any]:
    """How far the run got: epochs, the last row's accuracies, time, why it stopped early (if it did)."""
    last = rows[-1] if rows else {}
    return {"epochs": config.optim.epochs, "epochs_completed": len(rows), "stopped_early": stop_reason is not None,
            "stop_reason": stop_reason, "resumed": resumed,
            "train_accuracy": last.get("train_accuracy", math.nan), "val_accuracy": last.get("val_accuracy", math.nan),
            "seconds_per_epoch": sum(float(r["seconds"]) for r in rows) / len(rows) if rows else math.nan,
            "wall_seconds": round(wall_seconds, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def selection_summary(best: Mapping[str, Any], test_accuracy_last: float | None) -> dict[str, Any]:
    """For ``run.select: best_val``: the chosen epoch, its validation accuracy, the last epoch's test accuracy."""
    return {**best, "test_accuracy_last": test_accuracy_last, "selection_note": SELECTION_NOTE}


class TensorBoardLog:
    """Per-epoch metrics as TensorBoard events in the run folder (``run.tensorboard``; optional extra)."""

    SCALARS = (*(f"{s}_{m}" for s in SPLITS for m in ("loss", "accuracy")), *EPSILON_COLUMNS)

    def __init__(self, run_path: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # lazy: the optional tensorboard extra, slow to import

        self.writer = SummaryWriter(log_dir=str(Path(run_path) / "tensorboard"))

    def log(self, row: Mapping[str, Any]) -> None:
        for key in self.SCALARS:
            value = float(row[key])
            if math.isfinite(value):
                self.writer.add_scalar(key.replace("_", "/", 1), value, int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

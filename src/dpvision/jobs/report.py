"""What a run tells people: the per-epoch line, the closing summary, ``summary.json``, TensorBoard.

Example:
    >>> import torch
    >>> group_accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]), ["a", "a", "b"])
    {'a': {'accuracy': 0.5, 'count': 2}, 'b': {'accuracy': 1.0, 'count': 1}}
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from dpvision.privacy.accounting import ACCOUNTANTS

SELECTION_NOTE = ("the test set judges the weights of the best validation epoch; DP-SGD protects the training "
                  "set only, so the validation images and this choice are not private")


def group_accuracy(predictions, labels, groups: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{group: {"accuracy": a, "count": n}}`` for the examples that ``groups`` labels, sorted by group."""
    correct = (predictions == labels).tolist()
    totals: dict[str, list[int]] = {}
    for group, ok in zip(groups, correct):
        hits = totals.setdefault(group, [0, 0])
        hits[0] += int(ok)
        hits[1] += 1
    return {g: {"accuracy": hits / n, "count": n} for g, (hits, n) in sorted(totals.items())}


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


def final_line(summary: Mapping[str, Any]) -> str:
    """The closing lines of every job: accuracy, ε under every accountant, where the outputs are, wall time."""
    if summary["dp"]:
        others = ", ".join(f"{name} {summary['epsilons'][name]:.4f}" for name in ACCOUNTANTS
                           if name != summary["accountant"])
        privacy = (f"ε = {summary['epsilon']:.4f} ({summary['accountant']}; {others}) at δ = {summary['delta']:.3g}"
                   f" after {summary['steps']} steps")
    else:
        privacy = "no DP (ε = ∞)"
    chosen = f" (best validation epoch {summary['best_epoch']})" if summary.get("test_accuracy_last") is not None \
        else ""
    judged = (f"test accuracy {summary['test_accuracy']:.4f}{chosen}" if not math.isnan(summary["test_accuracy"])
              else f"validation accuracy {summary['val_accuracy']:.4f} (test set not evaluated)")
    return (f"Done in {summary['wall_seconds']:.1f}s: {judged} | "
            f"{privacy}\nOutputs: {summary['run_dir']}/ (config.yaml, metrics.csv, summary.json, model.pt, "
            "curves.png)")


def summarize(config, plan, data, engine, device, rows, epsilons, *, test_loss, test_accuracy, per_class,
              per_group, test_accuracy_last, best_epoch, best_val, stop_reason, resumed, steps, wall_seconds,
              run_dir) -> dict[str, Any]:
    """The run's ``summary.json``."""
    from dpvision.runs import library_versions

    def split(groups):
        if groups is None:
            return None, None
        return ({g: v["accuracy"] for g, v in groups.items()}, {g: v["count"] for g, v in groups.items()})

    class_acc, class_count = split(per_class)
    group_acc, group_count = split(per_group)
    summary = {
        "dataset": config.data.dataset, "model": config.model.name, "dp": plan.dp,
        "test_accuracy": test_accuracy, "test_loss": test_loss,
        "test_accuracy_per_class": class_acc, "test_count_per_class": class_count,
        "test_accuracy_per_group": group_acc, "test_count_per_group": group_count,
        "epsilon": epsilons[f"epsilon_{config.dp.accountant}"], "accountant": config.dp.accountant,
        "epsilons": {name: epsilons[f"epsilon_{name}"] for name in ACCOUNTANTS},
        "delta": plan.delta, "noise_multiplier": plan.noise_multiplier, "max_grad_norm": plan.max_grad_norm,
        "sample_rate": plan.sample_rate, "steps": steps, "steps_per_epoch": plan.steps_per_epoch,
        "epochs": config.optim.epochs, "epochs_completed": len(rows),
        "target_epsilon": config.dp.target_epsilon, "max_epsilon": config.dp.max_epsilon,
        "stopped_early": stop_reason is not None, "stop_reason": stop_reason, "resumed": resumed,
        "train_accuracy": rows[-1]["train_accuracy"] if rows else math.nan,
        "val_accuracy": rows[-1]["val_accuracy"] if rows else math.nan,
        "num_train": plan.num_train, "num_val": len(data.val) if data.val is not None else 0,
        "num_test": len(data.test), "class_names": list(data.class_names),
        "engine": engine.name, "device": str(device), "seed": config.run.seed,
        "seconds_per_epoch": sum(float(r["seconds"]) for r in rows) / len(rows) if rows else math.nan,
        "wall_seconds": round(wall_seconds, 3), "versions": library_versions(), "run_dir": str(run_dir),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if config.run.select == "best_val":
        summary.update({"test_accuracy_last": test_accuracy_last, "best_epoch": best_epoch,
                        "best_val_accuracy": best_val if best_epoch else math.nan, "selection_note": SELECTION_NOTE})
    return summary


class TensorBoardLog:
    """Per-epoch metrics as TensorBoard events in the run folder (``run.tensorboard``; optional extra)."""

    SCALARS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
               *(f"epsilon_{name}" for name in ACCOUNTANTS))

    def __init__(self, run_path: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_path) / "tensorboard"))

    def log(self, row: Mapping[str, Any]) -> None:
        for key in self.SCALARS:
            value = float(row[key])
            if math.isfinite(value):
                self.writer.add_scalar(key.replace("_", "/", 1), value, int(row["epoch"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

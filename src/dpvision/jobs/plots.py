"""Figures of a training run.

The run's ``curves.png`` is drawn on a bare ``matplotlib.figure.Figure`` (no pyplot,
no global backend change), so it works on machines without a display and leaves a
notebook's inline backend alone.

* :func:`plot_curves` — train/validation accuracy and ε per epoch (the run's ``curves.png``).
* :func:`plot_group_accuracy` — test accuracy per class or per stratum for several runs side by side.

Example:
    >>> rows = [{"epoch": 1, "train_accuracy": 0.6, "val_accuracy": 0.7, "epsilon": 1.0}]
    >>> plot_curves(rows, "/tmp/curves.png", title="demo")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _floats(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    out = []
    for row in rows:
        try:
            out.append(float(row[key]))
        except (KeyError, TypeError, ValueError):
            out.append(math.nan)
    return out


def curves_figure(rows: Sequence[Mapping[str, Any]], *, title: str = ""):
    """A figure with accuracy (train, and validation/test where measured) on the left and ε on the right, per epoch."""
    epochs = [int(float(row["epoch"])) for row in rows]
    fig = Figure(figsize=(10, 3.8))
    acc_ax, eps_ax = fig.subplots(1, 2)
    acc_ax.plot(epochs, _floats(rows, "train_accuracy"), "o-", label="train (under DP: noisy, clipped steps)")
    for key, style, label in (("val_accuracy", "s-", "validation"), ("test_accuracy", "d-", "test")):
        values = _floats(rows, key)
        if any(not math.isnan(v) for v in values):
            acc_ax.plot(epochs, values, style, label=label)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0.0, 1.0)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right", fontsize=8)
    acc_ax.set_title("accuracy")
    epsilons = _floats(rows, "epsilon")
    if all(math.isinf(e) for e in epsilons if not math.isnan(e)):
        eps_ax.text(0.5, 0.5, "no DP: ε = ∞", ha="center", va="center", transform=eps_ax.transAxes, fontsize=12)
        eps_ax.set_xticks(epochs)
    else:
        for key, style in (("epsilon_rdp", "o-"), ("epsilon_prv", "^--"), ("epsilon_pld", "v:")):
            if rows and key in rows[0]:
                eps_ax.plot(epochs, _floats(rows, key), style, label=key.split("_", 1)[1].upper())
        eps_ax.legend(loc="upper left", fontsize=8)
        eps_ax.set_ylim(bottom=0.0)
    eps_ax.set_xlabel("epoch")
    eps_ax.set_ylabel("ε (spent so far)")
    eps_ax.grid(alpha=0.3)
    eps_ax.set_title("privacy spent")
    for ax in (acc_ax, eps_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Write :func:`curves_figure` to ``path`` (PNG) and close it."""
    fig = curves_figure(rows, title=title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_group_accuracy(results: Mapping[str, Mapping[str, float]], *, ax=None, title: str = "",
                        counts: Mapping[str, int] | None = None):
    """Grouped bars: one group per class/stratum, one bar per run (``{run: {group: accuracy}}``)."""
    if ax is None:
        ax = Figure(figsize=(7, 3.5)).subplots()
    groups = sorted({g for accs in results.values() for g in accs})
    width = 0.8 / max(len(results), 1)
    for i, (name, accs) in enumerate(results.items()):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, [accs.get(g, math.nan) for g in groups], width=width, label=name)
    labels = [f"{g}\n(n={counts[g]})" if counts and g in counts else g for g in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("test accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return ax

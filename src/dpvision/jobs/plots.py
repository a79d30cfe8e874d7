"""Figures of a training run.

The run's ``curves.png`` is drawn on a bare ``matplotlib.figure.Figure`` (no pyplot,
no global backend change), so it works on machines without a display and leaves a
notebook's inline backend alone.

* :func:`plot_curves` — train/validation accuracy and ε per epoch (the run's ``curves.png``).
* :func:`plot_group_accuracy` — test accuracy per class or per stratum for several runs side by side.
* :func:`class_colors` — one colour per class name, the same in every panel and figure.

Every legend sits outside its axes (:func:`legend_outside`), so it never hides a point or a bar, and
the figures use matplotlib's constrained layout, which makes room for it.

Example:
    >>> rows = [{"epoch": 1, "train_accuracy": 0.6, "val_accuracy": 0.7, "epsilon": 1.0}]
    >>> plot_curves(rows, "/tmp/curves.png", title="demo")  # doctest: +SKIP
    >>> train_label(dp=True), train_label(dp=False)
    ('train (DP-SGD: noisy, clipped steps)', 'train (no DP)')
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


def train_label(*, dp: bool) -> str:
    """The legend entry of the training curve: under DP it is measured on the noisy, clipped steps."""
    return "train (DP-SGD: noisy, clipped steps)" if dp else "train (no DP)"


def rows_are_dp(rows: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a run's rows come from DP training: σ > 0 in ``metrics.csv`` (0 without DP); rows without a
    ``noise_multiplier`` column: some epoch has a finite ε (a non-private run logs ``inf``)."""
    sigmas = [s for s in _floats(rows, "noise_multiplier") if not math.isnan(s)]
    if sigmas:
        return any(s > 0 for s in sigmas)
    return any(math.isfinite(e) for e in _floats(rows, "epsilon"))


def legend_outside(ax, *, where: str = "right", ncol: int = 1, **kwargs):
    """A legend beside (``right``) or under (``below``) the axes, never over the data."""
    if where == "right":
        return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, ncol=ncol, **kwargs)
    # below: under the x label (axes coordinates: 0 is the bottom spine; -0.16 clears the tick labels and the x label)
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), borderaxespad=0.0, ncol=ncol, **kwargs)


def class_colors(names: Sequence[str]) -> dict[str, str]:
    """``{class name: colour}``: sorted names take matplotlib's cycle in order, whatever order a panel lists them."""
    return {name: f"C{i % 10}" for i, name in enumerate(sorted(names))}


def curves_figure(rows: Sequence[Mapping[str, Any]], *, title: str = "", dp: bool | None = None):
    """A figure with accuracy (train, and validation/test where measured) on the left and ε on the right, per epoch.

    ``dp`` says whether the run trained under DP (it names the training curve); by default it is read from the
    rows (a finite ε somewhere).
    """
    dp = rows_are_dp(rows) if dp is None else dp
    epochs = [int(float(row["epoch"])) for row in rows]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    acc_ax, eps_ax = fig.subplots(1, 2)
    acc_ax.plot(epochs, _floats(rows, "train_accuracy"), "o-", label=train_label(dp=dp))
    for key, style, label in (("val_accuracy", "s-", "validation"), ("test_accuracy", "d-", "test")):
        values = _floats(rows, key)
        if any(not math.isnan(v) for v in values):
            acc_ax.plot(epochs, values, style, label=label)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0.0, 1.0)
    acc_ax.grid(alpha=0.3)
    legend_outside(acc_ax, where="below", ncol=3, fontsize=8)
    acc_ax.set_title("accuracy")
    if not dp:
        eps_ax.text(0.5, 0.5, "no DP: ε = ∞", ha="center", va="center", transform=eps_ax.transAxes, fontsize=12)
        eps_ax.set_yticks([])
    else:
        for key, style in (("epsilon_rdp", "o-"), ("epsilon_prv", "^--"), ("epsilon_pld", "v:")):
            if rows and key in rows[0]:
                eps_ax.plot(epochs, _floats(rows, key), style, label=key.split("_", 1)[1].upper())
        legend_outside(eps_ax, where="below", ncol=3, fontsize=8)
        eps_ax.set_ylim(bottom=0.0)
    eps_ax.set_xlim(acc_ax.get_xlim())  # the same epochs under both panels
    eps_ax.set_xlabel("epoch")
    eps_ax.set_ylabel("ε (spent so far)")
    eps_ax.grid(alpha=0.3)
    eps_ax.set_title("privacy spent")
    for ax in (acc_ax, eps_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, title: str = "") -> Path:
    """Write :func:`curves_figure` to ``path`` (PNG)."""
    fig = curves_figure(rows, title=title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def plot_group_accuracy(results: Mapping[str, Mapping[str, float]], *, ax=None, title: str = "",
                        counts: Mapping[str, int] | None = None):
    """Grouped bars: one group per class/stratum, one bar per run (``{run: {group: accuracy}}``)."""
    if ax is None:
        ax = Figure(figsize=(8, 3.5), layout="constrained").subplots()
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
    legend_outside(ax, fontsize=8)
    if title:
        ax.set_title(title)
    return ax

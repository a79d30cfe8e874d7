"""Figures say what the run did and show all their data (issue 21, item 5).

* ``curves.png`` names the training curve after the run: DP-SGD's noisy, clipped steps only under DP.
* No legend sits over the data: every legend of every figure the project draws lies outside its axes.
* The notebooks' figures: one colour per class in both histogram panels (notebook 1), legends beside the
  per-stratum bars (notebook 2). Their cells are run here on tiny stand-in data, as the notebook runs them.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import random
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from dpvision.jobs.plots import class_colors, curves_figure, plot_group_accuracy, rows_are_dp, train_label
from dpvision.jobs.sweep_report import frontier_figure

matplotlib.use("Agg")  # the notebook cells below draw through pyplot: no display here
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

REPO = Path(__file__).resolve().parents[1]


def metrics_rows(*, dp: bool, epochs: int = 4) -> list[dict]:
    """Rows as ``metrics.csv`` stores them (strings; a non-private run logs ε = inf)."""
    rows = []
    for e in range(1, epochs + 1):
        eps = f"{0.6 * math.sqrt(e):.4f}" if dp else "inf"
        rows.append({"epoch": str(e), "train_accuracy": f"{0.5 + 0.1 * e:.3f}", "val_accuracy": f"{0.52 + 0.1 * e:.3f}",
                     "test_accuracy": "nan", "noise_multiplier": "1.1" if dp else "0.0", "epsilon": eps,
                     "epsilon_rdp": eps, "epsilon_prv": eps, "epsilon_pld": eps})
    return rows


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def assert_legends_outside(fig) -> None:
    """Every legend's drawn box is disjoint from its axes' box (so from every point, line and bar in it)."""
    canvas = FigureCanvasAgg(fig)  # a bare Figure has no renderer of its own
    canvas.draw()  # lays out (constrained layout moves the axes to make room)
    renderer = canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends, "the figure has no legend to check"
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box, area = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
        overlap_w = min(box.x1, area.x1) - max(box.x0, area.x0)
        overlap_h = min(box.y1, area.y1) - max(box.y0, area.y0)
        assert overlap_w <= 0 or overlap_h <= 0, f"legend {legend_texts(ax)} covers the axes {ax.get_title()!r}"
        assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1), "legend cut off the figure"


def test_a_run_without_dp_is_not_labelled_as_dp():
    rows = metrics_rows(dp=False)
    assert not rows_are_dp(rows)
    acc_ax = curves_figure(rows).axes[0]
    assert legend_texts(acc_ax)[0] == train_label(dp=False) == "train (no DP)"
    assert not any("noisy" in t or "clipped" in t for t in legend_texts(acc_ax))


def test_a_dp_run_says_its_training_steps_are_noisy_and_clipped():
    rows = metrics_rows(dp=True)
    assert rows_are_dp(rows)
    assert rows_are_dp([dict(r, epsilon="inf") for r in rows])  # σ > 0 says DP even where an accountant gave inf
    assert rows_are_dp([{k: v for k, v in r.items() if k != "noise_multiplier"} for r in rows])  # no σ column
    assert legend_texts(curves_figure(rows).axes[0])[0] == "train (DP-SGD: noisy, clipped steps)"
    assert legend_texts(curves_figure(rows, dp=False).axes[0])[0] == "train (no DP)"  # the caller may say


def test_curves_from_a_real_metrics_csv_header(tmp_path):
    """The labels come from what the job writes: its own columns, read back with csv as notebook 2 does."""
    from dpvision.jobs.report import METRIC_COLUMNS

    path = tmp_path / "metrics.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, restval="nan")
        writer.writeheader()
        writer.writerows(metrics_rows(dp=False))
    with path.open(newline="") as f:
        fig = curves_figure(list(csv.DictReader(f)))
    assert legend_texts(fig.axes[0]) == ["train (no DP)", "validation"]
    assert [t.get_text() for t in fig.axes[1].texts] == ["no DP: ε = ∞"]


@pytest.mark.parametrize("dp", [True, False])
def test_curves_legends_are_outside_the_axes(dp):
    assert_legends_outside(curves_figure(metrics_rows(dp=dp, epochs=10), title="t"))


def sweep_rows(values=("",)) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for value in values:
        for eps, acc in ((0.5, 0.80), (1.0, 0.88), (3.0, 0.95), (math.inf, 0.99)):
            rows += [{"target_epsilon": eps, "value": value, "test_accuracy": acc + rng.uniform(-0.01, 0.01)}
                     for _ in range(3)]
    return rows


@pytest.mark.parametrize("vary", [None, "optim.lr"])
def test_frontier_legend_hides_no_point(vary):
    """The issue's case: the ε = 3 point sat under the legend in the lower right corner."""
    fig = frontier_figure(sweep_rows(("0.1", "0.2") if vary else ("",)), vary=vary)
    assert_legends_outside(fig)


def test_group_bars_legend_beside_the_bars():
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    axes = fig.subplots(1, 2)
    plot_group_accuracy({"baseline": {"a": 0.99, "b": 0.98}, "DP-SGD": {"a": 0.97, "b": 1.0}}, ax=axes[0],
                        counts={"a": 3, "b": 4})
    plot_group_accuracy({"baseline": {"x": 1.0}, "DP-SGD": {"x": 0.9}}, ax=axes[1])
    assert_legends_outside(fig)


def test_class_colors_do_not_depend_on_the_order_a_panel_lists_classes():
    assert class_colors(["no_eyeglasses", "eyeglasses"]) == class_colors(["eyeglasses", "no_eyeglasses"])
    assert len(set(class_colors(["a", "b", "c"]).values())) == 3


# -- the notebooks' own plotting cells -------------------------------------------------------------------------------

def notebook_cell(name: str, needle: str) -> str:
    """The source of the code cell of notebook ``name`` containing ``needle``, as make_notebooks.py writes it."""
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "notebooks" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cells = [c.source for c in module.NOTEBOOKS[name]().cells if c.cell_type == "code" and needle in c.source]
    assert len(cells) == 1, f"{name}: {len(cells)} cells contain {needle!r}"
    return cells[0]


def run_cell(name: str, needle: str, namespace: dict):
    """Run the cell with the imports of the notebook's import cell; the figure it drew (pyplot's current one)."""
    imports = notebook_cell(name, "import matplotlib.pyplot as plt")
    plt.close("all")
    exec("\n".join(line for line in imports.splitlines() if not line.startswith("%")), namespace)
    exec(notebook_cell(name, needle), namespace)
    fig = plt.gcf()
    plt.close("all")
    return fig


def test_notebook_1_histograms_keep_one_colour_per_class():
    rng = np.random.default_rng(0)
    iod = rng.uniform(20, 40, size=200)
    glasses = rng.random(200) < 0.2
    classes = ["eyeglasses", "no_eyeglasses"]
    index = [{"split": "train", "class_name": classes[i % 2], "interocular_distance": str(25 + i % 10)}
             for i in range(40)]
    fig = run_cell("01_data_and_preprocessing.ipynb", "ax0.hist(", {
        "iod": iod, "glasses": glasses, "classes": classes, "index": index,
        "plan": {"iod_bin_edges": [25.0, 30.0, 35.0]}})
    colours = {}
    for ax in fig.axes:
        legend = ax.get_legend()
        for text, handle in zip(legend.get_texts(), legend.legend_handles):
            label = text.get_text().replace(" ", "_")
            colours.setdefault(label, set()).add(to_hex(handle.get_facecolor()))
    assert sorted(colours) == classes
    assert all(len(c) == 1 for c in colours.values()), f"a class changes colour between panels: {colours}"
    assert_legends_outside(fig)


def test_notebook_2_group_bars_have_their_legends_beside_them():
    per_group = {"iod_bin=0": 1.0, "iod_bin=1": 0.98, "iod_bin=2": 1.0, "iod_bin=3": 0.97}
    per_class = {"eyeglasses": 1.0, "no_eyeglasses": 0.99}
    summary = {"test_accuracy_per_group": per_group, "test_accuracy_per_class": per_class,
               "test_count_per_group": dict.fromkeys(per_group, 10),
               "test_count_per_class": dict.fromkeys(per_class, 20)}
    fig = run_cell("02_training_baseline_vs_dp.ipynb", "plot_group_accuracy({", {
        "baseline": summary, "dp": summary, "print": lambda *a, **k: None})
    assert len(fig.axes) == 2
    assert_legends_outside(fig)


def test_notebook_2_epsilon_plot_legend_beside_the_lines():
    fig = run_cell("02_training_baseline_vs_dp.ipynb", "sigmas = [", {"N_TRAIN": 1000, "print": lambda *a, **k: None})
    assert_legends_outside(fig)

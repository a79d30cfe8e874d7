"""Both tutorial notebooks run top to bottom in small mode (``DPVISION_NOTEBOOK_SMALL=1``) with nbclient.

They work in a temporary folder given by ``DPVISION_NOTEBOOK_DIR`` and must leave
the repository untouched; the stored notebooks carry no outputs and are exactly what
``notebooks/make_notebooks.py`` writes. Every cell that draws a figure must show it
as an ``image/png`` output (a figure that only prints ``<Figure size ...>`` is a bug).
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_data_and_preprocessing.ipynb", "02_training_baseline_vs_dp.ipynb"]
BUDGET_S = 90  # per notebook, on 2 CPU cores
# A code cell that calls one of these draws a figure, and must display it.
PLOT_CALL = re.compile(r"\bplt\.(subplots|figure|show)\(|\b(curves_figure|plot_group_accuracy|plot_curves)\(")
PLOT_CELLS = {"01_data_and_preprocessing.ipynb": 2, "02_training_baseline_vs_dp.ipynb": 3}  # so none goes unnoticed


def load_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "notebooks" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def repo_files() -> set[str]:
    """Files where a notebook could write by mistake: next to itself, or a repo-root runs/ or data/.

    (Not ``git status``: other people edit the working tree while the tests run.)
    """
    found = set()
    for folder in ("notebooks", "runs", "data"):
        root = REPO / folder
        if root.exists():
            found |= {str(p.relative_to(REPO)) for p in root.rglob("*") if "__pycache__" not in p.parts}
    return found


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: stored with outputs"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_what_the_generator_writes(name):
    stored = (REPO / "notebooks" / name).read_text(encoding="utf-8")
    assert stored == load_generator().render(name), f"{name}: edit notebooks/make_notebooks.py and re-run it"


def plotting_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and PLOT_CALL.search(c.source)]


def test_plot_detection_sees_a_bare_figure_as_not_shown():
    cell = nbformat.v4.new_code_cell("display(curves_figure(rows))")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/plain": "<Figure size 1000x380 with 2 Axes>"})]
    assert plotting_cells(nbformat.v4.new_notebook(cells=[cell])) == [cell] and not shown_figures(cell)


def shown_figures(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_in_small_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DPVISION_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("DPVISION_NOTEBOOK_DIR", str(tmp_path / "work"))
    before = repo_files()
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    started = time.perf_counter()
    NotebookClient(nb, timeout=BUDGET_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    elapsed = time.perf_counter() - started
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(tmp_path / "work") in text  # it used the folder it was given
    assert repo_files() == before, "the notebook wrote into the repository"
    cells = plotting_cells(nb)
    assert len(cells) == PLOT_CELLS[name]
    for cell in cells:
        assert shown_figures(cell) >= 1, f"{name}: this plotting cell shows no image:\n{cell.source}"
    bare = [o["data"]["text/plain"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "<Figure size" in o.get("data", {}).get("text/plain", "") and "image/png" not in o["data"]]
    assert not bare, f"{name}: figures displayed as text, not drawn: {bare}"
    if name.startswith("02"):
        runs = tmp_path / "work" / "nb02" / "runs"
        for mode, run_name in (("baseline", "baseline"), ("dp", "dp_eps8")):
            assert (runs / f"celeba_{mode}" / run_name / "summary.json").is_file()
        assert "test accuracy" in text
    assert elapsed < 3 * BUDGET_S  # each cell is bounded by BUDGET_S; the whole notebook should be too (loaded CI: x3)

"""Both tutorial notebooks run top to bottom in small mode (``DPVISION_NOTEBOOK_SMALL=1``) with nbclient.

They work in a temporary folder given by ``DPVISION_NOTEBOOK_DIR`` and must leave
the repository untouched; the stored notebooks carry no outputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ["01_data_and_preprocessing.ipynb", "02_training_baseline_vs_dp.ipynb"]
BUDGET_S = 90  # per notebook, on 2 CPU cores


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
    figures = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(figures) >= 2, "the notebook's plots were not displayed"
    if name.startswith("02"):
        runs = tmp_path / "work" / "nb02" / "runs"
        for mode, run_name in (("baseline", "baseline"), ("dp", "dp_eps8")):
            assert (runs / f"celeba_{mode}" / run_name / "summary.json").is_file()
        assert "test accuracy" in text
    assert elapsed < 3 * BUDGET_S  # each cell is bounded by BUDGET_S; the whole notebook should be too (loaded CI: x3)

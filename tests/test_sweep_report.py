"""``report.md`` of a sweep says what the runs did with the test set (issue 21, item 6): read from each run's
``config.yaml``, never a fixed sentence ("evaluated once per run" while ``metrics.csv`` has it every epoch)."""

from __future__ import annotations

import math

import pytest
import yaml

from dpvision.jobs.sweep_report import report_text


def rows_with_runs(tmp_path, run_settings: list[dict]) -> list[dict]:
    rows = []
    for i, run in enumerate(run_settings):
        folder = tmp_path / f"run{i}"
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump({"data": {}, "run": run}))
        rows.append({"target_epsilon": 1.0 if i else math.inf, "value": "", "test_accuracy": 0.9,
                     "run_dir": str(folder)})
    return rows


def report(rows) -> str:
    return report_text(rows, points=rows, vary=None, command="dpvision sweep ...")


def test_test_set_every_epoch_is_reported_as_such(tmp_path):
    """The MNIST seed's recipe: the test set after every epoch, the last epoch's weights reported."""
    text = report(rows_with_runs(tmp_path, [{"test_every_epoch": True, "select": "last"}] * 2))
    assert "once per run" not in text and "once, at the end" not in text
    assert "Every run evaluated the test set after every epoch (`run.test_every_epoch: true`" in text
    assert "that of the last epoch's weights" in text


def test_test_set_once_at_the_end(tmp_path):
    text = report(rows_with_runs(tmp_path, [{"test_every_epoch": False, "select": "best_val"}] * 2))
    assert ("Each run evaluated the test set once, at the end, on the weights of the best validation epoch "
            "(`run.test_every_epoch: false`).") in text


def test_test_set_never_looked_at(tmp_path):
    text = report(rows_with_runs(tmp_path, [{"evaluate_test": False, "test_every_epoch": True}]))
    assert "No run looked at the test set (`run.evaluate_test: false`)" in text


@pytest.mark.parametrize("second", [{"test_every_epoch": False}, None])
def test_mixed_or_unreadable_settings_point_to_the_configs(tmp_path, second):
    rows = rows_with_runs(tmp_path, [{"test_every_epoch": True}, second or {}])
    if second is None:
        (tmp_path / "run1" / "config.yaml").write_text("run: [unclosed")
    assert "How each run used the test set is in its `config.yaml`" in report(rows)


def test_one_seed_has_no_spread_and_several_seeds_do(tmp_path):
    """A point run on one seed says so instead of printing a standard deviation of 0."""
    rows = rows_with_runs(tmp_path, [{}] * 3)  # the no-DP point (one seed), then ε = 1 twice (two seeds)
    rows[2]["test_accuracy"] = 0.8
    table = [line for line in report(rows).splitlines() if line.startswith("| as given")]
    assert table == ["| as given | 1 | 0.8500 ± 0.0707 | 2 |",
                     "| as given | ∞ (no DP) | 0.9000 (one seed: no spread) | 1 |"]

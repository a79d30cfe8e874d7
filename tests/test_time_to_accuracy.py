"""benchmarks/time_to_accuracy.py: curves per ε, sittings cut by --max-minutes, resumed to the same result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.data_fixtures import write_cifar10

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmark's modules import each other by name

import time_to_accuracy  # noqa: E402


def curves(report: dict) -> list:
    """Everything but the wall seconds, which differ between sittings."""
    return [(r["target_epsilon"], r["status"], [{k: v for k, v in p.items() if k != "seconds"} for p in r["points"]])
            for r in report["results"]]


@pytest.mark.slow
def test_sittings_resume_to_the_result_of_one_run(tmp_path, capsys):
    write_cifar10(tmp_path / "data", 400, 60)
    common = ["--smoke", "--data-root", str(tmp_path / "data"), "--device", "cpu"]
    assert time_to_accuracy.main([*common, "--out", str(tmp_path / "once")]) == 0
    once = json.loads((tmp_path / "once" / "time_to_accuracy.json").read_text())
    assert once["complete"] and all(r["epochs_done"] == 3 for r in once["results"])
    # A tiny limit: each sitting stops right after its first epoch's checkpoint.
    cut = [*common, "--out", str(tmp_path / "cut"), "--max-minutes", "0.0001"]
    sittings = []
    for _ in range(8):
        assert time_to_accuracy.main(cut) == 0
        sittings.append(json.loads((tmp_path / "cut" / "time_to_accuracy.json").read_text()))
        if sittings[-1]["complete"]:
            break
    first = sittings[0]["results"]
    assert first[0]["status"] == "paused" and first[0]["epochs_done"] == 1 and first[1]["status"] == "not started"
    assert len(sittings) > 2 and "run the same command again" in capsys.readouterr().out
    assert curves(sittings[-1]) == curves(once)  # the same accuracies, steps, views and ε, epoch by epoch
    for r in once["results"]:
        views, seconds = [p["example_views"] for p in r["points"]], [p["seconds"] for p in r["points"]]
        assert views == sorted(views) and views[0] > 0
        assert seconds == sorted(seconds) and seconds[-1] > seconds[0] > 0  # cumulative wall seconds
        assert r["points"][-1]["epsilon"] == pytest.approx(r["target_epsilon"], rel=1e-2)
    page = tmp_path / "page.md"
    page.write_text("<!-- accuracy:cifar10:time -->\n<!-- /accuracy:cifar10:time -->\n")
    assert time_to_accuracy.main(["--write-docs", "--out", str(tmp_path / "cut"), "--docs", str(page)]) == 0
    text = page.read_text()
    assert "| 1 | 0 | 3/3 |" in text and "| 8 | 0 | 3/3 |" in text and "page_cifar10_time.png" in text


def test_bad_flags_are_one_line_errors(capsys):
    assert time_to_accuracy.main(["--max-minutes", "-1"]) == 2
    assert "--max-minutes must be a positive number" in capsys.readouterr().err
    assert time_to_accuracy.main(["--epsilons", "1,x"]) == 2
    assert "--epsilons must be a comma-separated list" in capsys.readouterr().err


def report(epsilon: float, accuracy: float, recipe: str) -> dict:
    """A finished one-point report, as measure() writes it."""
    points = [{"epoch": e, "epsilon": epsilon * e / 2, "example_views": 1000 * e, "seconds": 10.0 * e, "steps": e,
               "test_accuracy": accuracy * e / 2} for e in (1, 2)]
    return {"smoke": False, "command": f"python benchmarks/time_to_accuracy.py --epsilons {epsilon:g}",
            "recipe": recipe, "device": "CPU, torch x", "complete": True,
            "results": [{"target_epsilon": epsilon, "seed": 0, "status": "finished", "run_dir": "r", "epochs": 2,
                         "epochs_done": 2, "points": points}]}


def test_write_docs_puts_several_sittings_in_one_table(tmp_path, capsys):
    for name, eps, acc in (("a", 8, 0.686), ("b", 1, 0.5185)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "time_to_accuracy.json").write_text(json.dumps(report(eps, acc, f"/x/recipe_{name}.yaml")))
    page = tmp_path / "page.md"
    page.write_text("before\n<!-- accuracy:cifar10:time -->\nold\n<!-- /accuracy:cifar10:time -->\nafter\n")
    outs = ["--out", str(tmp_path / "a"), "--out", str(tmp_path / "b")]
    assert time_to_accuracy.main(["--write-docs", *outs, "--docs", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and text.startswith("before") and text.rstrip().endswith("after")
    assert "--epsilons 8\n" in text and "--epsilons 1\n" in text
    assert "| 8 | 0 | 2/2 | 68.60% | 8.000 | 20 | 2,000 |" in text and "`recipe_a.yaml` (a) |" in text
    assert "| 1 | 0 | 2/2 | 51.85% | 1.000 | 20 | 2,000 |" in text and "`recipe_b.yaml` (b) |" in text
    assert (tmp_path / "page_cifar10_time.png").read_bytes()[:4] == b"\x89PNG"
    assert time_to_accuracy.main(["--write-docs", "--out", str(tmp_path / "c"), "--docs", str(page)]) == 2
    assert "time_to_accuracy.json does not exist" in capsys.readouterr().err
    assert time_to_accuracy.main(outs + ["--epsilons", "8"]) == 2  # training takes one folder
    assert "--out: one folder to train into" in capsys.readouterr().err
    assert page.read_text() == text  # the refused calls wrote nothing

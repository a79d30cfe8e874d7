"""What a resume checks and says: a checkpoint whose privacy ledger the plan does not imply is refused (issue 20
item 2); a finished run is not trained again and says so; the closing lines name the outputs; no stale ``.lock``
(issue 21 item 6).

The issue's run: ``mnist.py`` with k 300, B 50 (q = 1/6, 6 steps an epoch), 4 epochs, stopped after epoch 1 by a
test hook; every test works on its own copy of that folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dpvision.checkpoint import CHECKPOINT_NAME
from dpvision.cli import main as dpvision_main
from dpvision.jobs.mnist_seed import main as mnist_main
from tests.job_helpers import Interrupt, exit_code, hooked, interrupt_at, metrics, rdp_epsilon, summary, working_dir

ARGS = ["--k", "300", "--batch-size", "50", "--epochs", "4", "--test-batch-size", "2000", "--quiet"]
Q = 1 / 6




def start(cwd: Path, data_root: Path, *extra, stop_after: int = 1) -> Path:
    """``mnist.py`` in ``cwd``, stopped after epoch ``stop_after``; its run folder."""
    with working_dir(cwd), hooked(interrupt_at("epoch", stop_after)), pytest.raises(Interrupt):
        mnist_main(["--data-root", str(data_root), *ARGS, *map(str, extra)])
    [run] = (cwd / "runs" / "mnist").iterdir()
    return run


def copy(run: Path, tmp: Path) -> Path:
    target = tmp / "runs" / "mnist" / run.name
    shutil.copytree(run, target)
    return target


def files(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_mnist_root) -> Path:
    """The issue's run, stopped after epoch 1 (copy it before changing it)."""
    return start(tmp_path_factory.mktemp("stopped"), tiny_mnist_root)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, stopped) -> Path:
    """``stopped``, resumed to its end."""
    tmp = tmp_path_factory.mktemp("finished")
    run = copy(stopped, tmp)
    with working_dir(tmp):
        assert exit_code(mnist_main, ["--resume", run, "--quiet"]) == 0
    return run


def test_an_unedited_checkpoint_resumes_to_the_epsilon_of_the_steps_taken(stopped, finished):
    assert torch.load(stopped / CHECKPOINT_NAME, weights_only=True)["ledger"]["history"] == [[1.3, Q, 6]]
    assert [int(r["steps"]) for r in metrics(finished)] == [6, 12, 18, 24]
    assert summary(finished)["steps"] == 24
    assert summary(finished)["epsilon"] == pytest.approx(rdp_epsilon(1.3, Q, 24, 1e-5), rel=1e-12)


def edit_checkpoint(**changes):
    def edit(run: Path) -> None:
        state = torch.load(run / CHECKPOINT_NAME, weights_only=True)
        for key, value in changes.items():
            if key == "history":
                state["ledger"]["history"] = value
            elif key == "rows":
                state["extra"]["metrics"] = [{**row, "steps": steps} for row, steps in zip(state["extra"]["metrics"],
                                                                                          value)]
            else:
                state[key] = value
        torch.save(state, run / CHECKPOINT_NAME)
    return edit


def edit_csv_steps(steps: int):
    def edit(run: Path) -> None:
        path = run / "metrics.csv"
        header, row = path.read_text().splitlines()
        columns = row.split(",")
        columns[header.split(",").index("steps")] = str(steps)
        path.write_text(f"{header}\n{','.join(columns)}\n")
    return edit


def forged_consistently(run: Path) -> None:
    """Ledger, step count, checkpoint rows and metrics.csv all say 3 steps: only the plan says otherwise."""
    edit_checkpoint(history=[[1.3, Q, 3]], steps=3, rows=[3])(run)
    edit_csv_steps(3)(run)


EDITS = {
    "issue_20_ledger": edit_checkpoint(history=[[1.3, 0.1666, 1]]),  # the edit: exit 0, ε 3.9799 before
    "other_sigma": edit_checkpoint(history=[[2.0, Q, 6]]),
    "fewer_steps": edit_checkpoint(history=[[1.3, Q, 5]], steps=5),
    "empty_ledger": edit_checkpoint(history=[]),
    "consistent_forgery": forged_consistently,
    "metrics_csv_steps": edit_csv_steps(5),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_a_checkpoint_whose_ledger_the_plan_does_not_imply_is_refused(edit, stopped, tmp_path, capsys):
    run = copy(stopped, tmp_path)
    edit(run)
    before = files(run)
    with working_dir(tmp_path):
        assert exit_code(dpvision_main, ["train", "--resume", run]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpvision train: error: ") and err.count("\n") == 1, err
    assert f"{run / CHECKPOINT_NAME}: " in err and "refusing to resume" in err, err
    assert files(run) == before  # nothing written, no .lock left


def test_a_finished_run_is_not_trained_again_and_says_so(finished, tmp_path, capsys):
    run = copy(finished, tmp_path)
    before = files(run)
    events = []
    with working_dir(tmp_path), hooked(lambda name, n: events.append((name, n))):
        assert exit_code(mnist_main, ["--resume", run]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert events == []  # not a single step
    assert lines[0] == f"Run {run} is already complete (4 epochs): nothing to train"
    assert lines[1].startswith(f"Done in {summary(run)['wall_seconds']:.1f}s: test accuracy ")
    assert lines[2] == (f"Outputs: {run}/ (config.yaml, metrics.csv, summary.json, model.pt, curves.png, "
                        "checkpoint.pt)")
    assert lines[3].startswith("Seed CSV: ")
    assert files(run) == before  # summary.json, weights and checkpoint as they were; no .lock


def test_a_run_the_budget_stopped_resumes_as_complete(tiny_mnist_root, tmp_path, capsys):
    """The budget cut epoch 2 to 3 steps; the process died before summary.json: the resume accepts the short
    epoch (what the budget allowed), trains nothing and writes the summary."""
    budget = (rdp_epsilon(1.3, Q, 9, 1e-5) + rdp_epsilon(1.3, Q, 10, 1e-5)) / 2  # 9 steps fit
    run = start(tmp_path, tiny_mnist_root, "--max-epsilon", repr(budget), stop_after=2)
    assert not (run / "summary.json").exists() and not (run / ".lock").exists()
    capsys.readouterr()
    events = []
    with working_dir(tmp_path), hooked(lambda name, n: events.append((name, n))):
        assert exit_code(mnist_main, ["--resume", run]) == 0
    out = capsys.readouterr().out
    assert events == [] and "is already complete (2 epochs; stopped early: privacy budget" in out, out
    result = summary(run)
    assert result["steps"] == 9 and result["stopped_early"] is True
    assert result["epsilon"] == pytest.approx(rdp_epsilon(1.3, Q, 9, 1e-5), rel=1e-12) and result["epsilon"] <= budget
    assert [int(r["steps"]) for r in metrics(run)] == [6, 9]


def test_no_stale_lock(stopped, finished):
    assert not (stopped / ".lock").exists()  # interrupted
    assert not (finished / ".lock").exists()  # finished

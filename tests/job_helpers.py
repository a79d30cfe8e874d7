"""Helpers shared by the training-job tests (test_train_job, test_resume, test_mnist_job, test_celeba_train,
test_job_faults): run a front-end in-process and get its exit status, interrupt a run at a chosen step,
read a run folder, and compare two runs exactly.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from opacus.accountants import RDPAccountant

from dpvision.cli_support import OneLineParser, given_flags

# metrics.csv columns that may differ between two runs of the same config: wall-clock time.
TIMING_COLUMNS = ("seconds",)


class Interrupt(Exception):
    """Raised by a test hook to simulate a crash at a chosen point of a run."""


def exit_code(main: Callable[[list[str]], int], argv: Sequence[str]) -> int:
    """The exit status of a front-end's ``main(argv)``: its return value or argparse's ``SystemExit``."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exit_info:
        return int(exit_info.code or 0)


@contextlib.contextmanager
def working_dir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def interrupt_at(event: str, value: int, *, epoch_of_step: int | None = None, exc: type[BaseException] = Interrupt):
    """A ``hook(event, n)`` raising ``exc`` at ``(event, value)``; for ``"step"``, only in epoch ``epoch_of_step``.

    ``"step"`` events count the steps of the current epoch; ``"epoch"`` events give the epoch just finished.
    """
    epochs_done = [0]

    def hook(name: str, n: int) -> None:
        if name == "epoch":
            epochs_done[0] = n
        if name == event and n == value and (epoch_of_step is None or epochs_done[0] + 1 == epoch_of_step):
            raise exc(f"{name} {n}")
    return hook


def train_config(argv: Sequence[str]):
    """The :class:`TrainConfig` that ``dpvision train <argv>`` would run (the CLI's own parsing)."""
    from dpvision.cli import add_train_arguments, train_config as cli_train_config

    parser = add_train_arguments(OneLineParser(prog="dpvision train"))
    argv = [str(a) for a in argv]
    return cli_train_config(parser.parse_args(argv), given_flags(parser, argv))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def metrics(run: Path, *, drop: Sequence[str] = TIMING_COLUMNS) -> list[dict[str, str]]:
    """metrics.csv rows without the wall-clock columns."""
    return [{k: v for k, v in row.items() if k not in drop} for row in read_csv(run / "metrics.csv")]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def weights(run: Path, name: str = "model.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / name, weights_only=True)


def assert_same_weights(a: Path, b: Path, name: str = "model.pt") -> None:
    wa, wb = weights(a, name), weights(b, name)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{name} differs in {different}"


def assert_same_run(run: Path, reference: Path) -> None:
    """Same metrics rows (all but the seconds), same final weights, same test accuracy and ε."""
    assert metrics(run) == metrics(reference)
    assert_same_weights(run, reference)
    got, want = summary(run), summary(reference)
    for key in ("test_accuracy", "epsilon", "epsilons", "delta", "steps", "noise_multiplier", "sample_rate",
                "test_accuracy_per_class", "test_accuracy_per_group", "epochs_completed"):
        assert got[key] == want[key], key


def rdp_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus's own RDP ε for ``steps`` Poisson-sampled Gaussian steps."""
    accountant = RDPAccountant()
    accountant.history = [(sigma, sample_rate, steps)]
    return accountant.get_epsilon(delta=delta)


def only_run(folder: Path) -> Path:
    """The single run folder inside ``folder`` (fails if there are none or several)."""
    [run] = [p for p in Path(folder).iterdir() if p.is_dir()]
    return run


@contextlib.contextmanager
def hooked(hook):
    """Every training run started inside (by any front-end) gets ``hook`` (e.g. one raising Ctrl-C)."""
    import dpvision.jobs.train as train_module

    original = train_module.run
    train_module.run = lambda *args, **kwargs: original(*args, **{**kwargs, "hook": hook})
    try:
        yield
    finally:
        train_module.run = original

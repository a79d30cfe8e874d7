"""The one training job: any dataset, any model, either engine, baseline or DP-SGD.

Reads like Opacus's ``examples/mnist.py``: :func:`train` runs one epoch,
:func:`evaluate_split` measures a split, :func:`run` is ``main()``. Everything a run
carries from epoch to epoch (epochs and steps done, the metrics rows, the best weights,
the EMA, the privacy ledger, the run folder's writers) lives in one :class:`Trainer`.
DP is the plan's (:func:`dpvision.jobs.setup.plan_privacy`); the baseline is the same
config with ``config.deactivated()``.

Run folder ``<runs_dir>/<group>/<run_name>/`` (group: the dataset, or the seed job's name)::

    config.yaml    the recipe that ran (a valid ``--config``) plus ``resolved``: σ, q, δ, N, data fingerprint
    metrics.csv    append-only, one row per epoch (loss/accuracy per split, ε under every accountant, seconds)
    summary.json   test accuracy overall, per class and per group; ε, δ, σ, q, steps; versions, wall time
    model.pt       weights after the last epoch (``model_best.pt`` too with ``run.select: best_val``)
    curves.png     accuracy and ε per epoch
    checkpoint.pt  everything ``--resume`` needs (model, optimizer, every generator, the privacy ledger)
    .lock          only while a process trains in the folder

Example:
    >>> from dpvision.jobs import TrainConfig, run
    >>> summary = run(TrainConfig.from_dict({"optim": {"epochs": 1}, "data": {"k": 1000}}))  # doctest: +SKIP
    >>> summary["test_accuracy"], summary["epsilon"]                                        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from dpvision.checkpoint import check_ledger
from dpvision.data.registry import DATASET_REGISTRY
from dpvision.engines import contrastive, evaluate
from dpvision.engines.distributed import DistContext
from dpvision.jobs import report
from dpvision.jobs.config import TrainConfig
from dpvision.jobs.ema import WeightAverage
from dpvision.jobs.features import release
from dpvision.jobs.loop import BestModel, EpochOutcome, epsilon_columns, train_private_epoch
from dpvision.jobs.plots import plot_curves
from dpvision.jobs.rundir import (
    CURVES, create_run, logged_steps, read_summary, reopen_run, resolved_section,
    run_outputs,
)  # fmt: skip
from dpvision.jobs.setup import Given, prepare
from dpvision.privacy import PrivacyBudget, PrivacyLedger

BEST_MODEL = BestModel.FILE
Hook = Callable[[str, int], None]  # ("step", steps so far this epoch) / ("epoch", epoch): tests interrupt here


@dataclass(frozen=True)
class Hooks:
    """What a front-end (or a test) plugs into a run; each is optional."""

    front_end: Callable[[dict], dict] | None = None  # resolved -> the front-end's own record in config.yaml
    on_rows: Callable[[object, list[dict]], None] | None = None  # (run_dir, rows) whenever metrics.csv changes
    # summary -> the front-end's own keys, added before summary.json is written (the CelebA seed's strata)
    summary_extra: Callable[[dict], dict] | None = None
    hook: Hook | None = None


def train(trainer: Trainer, epoch: int) -> EpochOutcome:
    """One epoch behind a progress bar over steps, cut short by the privacy budget if it must be."""
    hook = trainer.hooks.hook
    with tqdm(total=trainer.plan.steps_per_epoch, desc=f"Epoch {epoch}", unit="step", leave=False,
              disable=trainer.quiet, file=sys.stderr) as bar:
        done = 0  # counted here: a disabled tqdm does not count

        def progress(steps: int) -> None:
            nonlocal done
            bar.update(steps)
            done += steps
            if hook:
                hook("step", done)

        return train_private_epoch(trainer.engine, trainer.ledger, trainer.plan, budget=trainer.budget,
                                   progress=progress)


def evaluate_split(model, data, config: TrainConfig, device) -> tuple[float, float, object]:
    """Mean loss, accuracy and predictions [N] of ``model`` on one split (NaNs when there is none).

    Under the contrastive objective: its mean loss and pair accuracy (the share of views whose nearest other
    view is their partner), no predictions."""
    optim = config.optim
    if data is None:
        return math.nan, math.nan, None
    if optim.objective == "contrastive":
        return (*contrastive.evaluate(model, data, batch_size=optim.eval_batch_size, device=device,
                                      temperature=contrastive.resolve_temperature(optim.temperature),
                                      flip=DATASET_REGISTRY[config.data.dataset].allows_flip), None)
    return evaluate(model, data, batch_size=optim.eval_batch_size, device=device)


def judged(ema: WeightAverage | None, model):
    """The weights evaluation sees: the moving average when there is one, else the model's own."""
    return ema.applied() if ema is not None else contextlib.nullcontext(model)


class Trainer:
    """One run's state: the engine, the ledger, the EMA, the best weights, the rows, the run folder.

    Made from a config (or the run folder ``resume`` names, with ``overrides`` of its free
    keys) by :func:`~dpvision.jobs.setup.prepare`: every check first (nothing written), then the engine.
    ``epoch`` and ``steps`` count what is done (epochs completed, optimizer steps taken); a
    resume restores them, with everything else, from the checkpoint (:meth:`state_dict`).
    Only rank 0 holds the writers (``run_dir``, ``checkpointer``, ``tensorboard``).
    """

    def __init__(self, config: TrainConfig | None, dist: DistContext, hooks: Hooks, *, resume=None,
                 overrides: dict | None = None, given: Given = Given()) -> None:
        self.clock = time.monotonic()  # run.max_minutes counts from here: data loading and set-up included
        setup = prepare(config, dist, resume=resume, overrides=overrides, given=given)
        config, self.data, plan, self.engine = setup.config, setup.data, setup.plan, setup.engine
        self.config, self.plan, self.device, self.dist, self.hooks, self.resume = (
            config, plan, dist.device, dist, hooks, resume)
        self.ledger = PrivacyLedger.starting_with(plan.releases)  # spent before the first step (empty without DP)
        self.ema = None
        if config.optim.ema_decay is not None:
            self.ema = WeightAverage(self.engine.model, config.optim.ema_decay)
            optimizer = self.engine.optimizer
            self.ema.attach(getattr(optimizer, "original_optimizer", optimizer))  # under Opacus: the inner one
        self.budget = None
        if plan.dp and config.dp.max_epsilon is not None:
            self.budget = PrivacyBudget(max_epsilon=config.dp.max_epsilon, delta=plan.delta,
                                        accountant=config.dp.accountant)
        self.best = BestModel(config.run.select == "best_val")
        self.rows: list[dict] = []
        self.epoch = self.steps = 0
        self.stop_reason: str | None = None
        self.paused = False  # run.max_minutes ended this sitting (the run is not finished)
        self.run_dir = self.checkpointer = self.tensorboard = self.path = None
        self.quiet = config.run.quiet or not dist.is_main  # one voice: rank 0's
        self.started = time.perf_counter()  # reset when training starts

    @property
    def finished(self) -> bool:
        """Every epoch done, or the privacy budget ended the run."""
        return self.stop_reason is not None or self.epoch >= self.config.optim.epochs

    def state_dict(self) -> dict:
        """The checkpoint's ``extra``: rows, why training stopped, the best weights, the EMA."""
        return {"metrics": self.rows, "stop_reason": self.stop_reason, **self.best.state_dict(),
                **({"ema": self.ema.state_dict()} if self.ema is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint's ``epoch``, ``ledger`` and ``extra`` (the engine loads its own part)."""
        extra = state["extra"]
        self.epoch, self.rows = int(state["epoch"]), list(extra.get("metrics", []))
        self.steps = int(self.rows[-1]["steps"]) if self.rows else 0
        self.ledger.load_state_dict(state["ledger"])
        self.stop_reason = extra.get("stop_reason")
        self.best.load_state_dict(extra)
        if self.ema is not None and "ema" in extra:
            self.ema.load_state_dict(extra["ema"])

    @property
    def resumed(self) -> bool:
        return self.resume is not None

    def open(self, *, group: str | None, run_name: str | None) -> None:
        """Rank 0 creates (or reopens and locks) the run folder. On resume rank 0 reads and checks the
        checkpoint and every rank loads it (the engine scatters each rank's generators): the folder then
        holds exactly the checkpointed epochs."""
        if self.dist.is_main:
            if self.resume is None:
                resolved = resolved_section(self.plan, self.data, engine=self.engine.name, device=self.device)
                self.run_dir, self.checkpointer = create_run(self.config, self.plan, resolved, group=group,
                                                             run_name=run_name, front_end=self.hooks.front_end)
            else:
                self.run_dir, self.checkpointer = reopen_run(self.resume)
            self.best.path = self.run_dir.path / BestModel.FILE
        self.path = self.dist.broadcast_object(str(self.run_dir.path) if self.run_dir else None)
        if not self.resumed:
            return
        state = None
        if self.dist.is_main:
            logged = logged_steps(self.run_dir)
            state = self.checkpointer.read("cpu")  # generator states stay on the CPU
            if state is not None:
                check_ledger(state, self.plan, self.budget, logged=logged, path=self.checkpointer.path)
        if self.dist.broadcast_object(state is not None):
            self.engine.load_state_dict(state["engine"] if self.dist.is_main else None)
            saved = self.dist.broadcast_object(
                {k: state[k] for k in ("epoch", "steps", "ledger", "extra")} if self.dist.is_main else None)
            self.load_state_dict(saved)
        if self.run_dir is not None:
            self.run_dir.rewrite_metrics(self.rows)
            self.best.save()
            if self.hooks.on_rows and self.rows:
                self.hooks.on_rows(self.run_dir, self.rows)

    def fit(self) -> None:
        """Train the epochs still to run; after each, checkpoint, then write and print (rank 0)."""
        if not self.quiet:
            where = f"{self.device}" + (f" x {self.dist.world_size} processes" if self.dist.is_distributed else "")
            print(report.start_line(self.config, self.plan, engine=self.engine.name, device=where, path=self.path,
                                    resumed_at=self.epoch + 1 if self.resumed else None), flush=True)
        self.started = time.perf_counter()  # summary.json's wall time: this process's training and testing
        if self.run_dir is not None and self.config.run.tensorboard:
            self.tensorboard = report.TensorBoardLog(self.run_dir.path)
        while not self.finished:
            started = time.perf_counter()
            outcome = train(self, self.epoch + 1)
            self.stop_reason = outcome.stop_reason
            if outcome.result is None:  # not one step fits in the budget: no epoch to report
                break
            self.epoch, self.steps = self.epoch + 1, self.steps + outcome.steps
            self._end_epoch(outcome.result, started)
            if self._sitting_over(time.perf_counter() - started):
                self.paused = True
                break
        if self.stop_reason is not None and not self.quiet:
            print(f"Stopped early: {self.stop_reason}", flush=True)
        if self.tensorboard:
            self.tensorboard.close()

    def _sitting_over(self, epoch_seconds: float) -> bool:
        """``run.max_minutes``: whether the next epoch, as long as this one, would end past the limit. The epoch's
        checkpoint is saved by now; rank 0's clock decides, so every rank stops after the same epoch."""
        limit = self.config.run.max_minutes
        if limit is None or self.finished:
            return False
        late = time.monotonic() + epoch_seconds > self.clock + 60 * limit
        return bool(self.dist.broadcast_object(late if self.dist.is_main else None))

    def _end_epoch(self, result, started: float) -> None:
        """Judge the epoch's weights and make its row, then :meth:`_record` it."""
        config, device = self.config, self.device
        with judged(self.ema, self.engine.model) as model:
            val = evaluate_split(model, self.data.val, config, device)[:2]
            tested = (evaluate_split(model, self.data.test, config, device)[:2] if config.run.test_every_epoch
                      else (math.nan, math.nan))
            improved = self.best.update(self.epoch, val[1], model)
        epsilons = epsilon_columns(self.ledger, delta=self.plan.delta, dp=self.plan.dp,
                                   primary=self.config.dp.accountant)
        row = report.metrics_row(
            {"epoch": self.epoch, "steps": self.steps}, report.plan_columns(self.plan),
            report.split_metrics("train", result.loss, result.accuracy), report.split_metrics("val", *val),
            report.split_metrics("test", *tested),
            report.privacy_columns(epsilons, accountant=self.config.dp.accountant, delta=self.plan.delta),
            {"seconds": round(time.perf_counter() - started, 3)})
        line = report.epoch_line(row, improved=improved, dp=self.plan.dp)  # printed only once it is saved
        self.rows.append(row)
        self._record(improved, line)

    def _record(self, improved: bool, line: str) -> None:
        """Checkpoint first, then write and print (``line``): nothing about an epoch is released before the
        state that produced it is saved (docs/privacy.md). Every rank takes the engine's state (it gathers
        every rank's generators); rank 0 writes it."""
        engine_state = self.engine.state_dict()
        if self.run_dir is None:
            return
        self.checkpointer.save(engine_state=engine_state, ledger=self.ledger, epoch=self.epoch, steps=self.steps,
                               extra=self.state_dict())
        if improved:
            self.best.save()
        row = self.rows[-1]
        self.run_dir.append_metrics(row)
        if self.hooks.on_rows:
            self.hooks.on_rows(self.run_dir, self.rows)
        if self.tensorboard:
            self.tensorboard.log(row)
        if not self.quiet:
            print(line, flush=True)
        if self.hooks.hook:
            self.hooks.hook("epoch", self.epoch)

    def finish(self) -> dict:
        """Save the final weights, judge the selected ones on the test set, write summary and plot (rank 0)."""
        config, data = self.config, self.data
        with judged(self.ema, self.engine.model) as model:
            if self.run_dir is not None:
                self.run_dir.save_model(model)  # model.pt: the last epoch (its moving average with optim.ema_decay)
            last = None
            if self.best.weights is not None:
                if config.run.evaluate_test:
                    last = evaluate_split(model, data.test, config, self.device)[1]
                model.load_state_dict(self.best.weights)  # training is over: judge the selected weights
            tested = self._test(model)
        summary = self._summary(tested, test_accuracy_last=last)
        if self.hooks.summary_extra:
            summary.update(self.hooks.summary_extra(summary))
        if self.run_dir is not None:
            plot_curves(self.rows, self.run_dir.path / CURVES, title=report.curves_title(config, self.plan))
            self.run_dir.write_summary(summary)
        self.dist.barrier()  # the others wait until rank 0 has written everything
        return summary

    def _test(self, model) -> dict:
        """The test set's part of the summary (NaNs with ``run.evaluate_test: false``)."""
        if not self.config.run.evaluate_test:
            return report.summary_of_test(math.nan, math.nan, None, None)
        data = self.data
        loss, accuracy, predictions = evaluate_split(model, data.test, self.config, self.device)
        if predictions is None:  # the contrastive objective: no classes predicted
            return report.summary_of_test(loss, accuracy, None, None)
        labels = data.test.labels
        per_class = report.group_accuracy(predictions, labels, [data.class_names[int(y)] for y in labels])
        per_group = report.group_accuracy(predictions, labels, list(data.test_groups)) if data.test_groups else None
        return report.summary_of_test(loss, accuracy, per_class, per_group)

    def _summary(self, tested: dict, *, test_accuracy_last: float | None) -> dict:
        config, plan = self.config, self.plan
        epsilons = epsilon_columns(self.ledger, delta=plan.delta, dp=plan.dp, primary=config.dp.accountant)
        summary = {**report.setting_summary(config, plan, self.data, engine=self.engine.name, device=self.device),
                   **report.privacy_summary(config, plan, epsilons, steps=self.steps),
                   **report.progress_summary(config, self.rows, stop_reason=self.stop_reason, resumed=self.resumed,
                                             wall_seconds=time.perf_counter() - self.started),
                   **tested, "run_dir": self.path}
        if config.run.select == "best_val":
            summary.update(report.selection_summary(self.best.summary(), test_accuracy_last))
        if plan.dp:
            summary["epsilon_notes"] = self.ledger.epsilon_notes(delta=plan.delta)  # why an accountant says inf
        return summary

    def paused_summary(self) -> dict:
        """What a sitting that ``run.max_minutes`` ended returns: how far it got (no test set looked at, no
        summary.json: the run is not finished; ``--resume`` continues it)."""
        return {"status": "paused", "run_dir": self.path, "epoch": self.epoch, "epochs": self.config.optim.epochs,
                "steps": self.steps, "dp": self.plan.dp, "epsilon": self.rows[-1]["epsilon"],  # a pause follows a row
                "max_minutes": self.config.run.max_minutes}

    def completed(self) -> dict:
        """A finished run resumed: nothing to train; its summary (written again only if it was lost)."""
        saved = self.dist.broadcast_object(read_summary(self.run_dir) if self.run_dir is not None else None)
        return self.finish() if saved is None else {**saved, "run_dir": self.path}

    def close(self) -> None:
        release(self.engine.model)  # with cached features: the model takes images again
        if self.run_dir is not None:
            self.run_dir.unlock()


def run(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None, overrides: dict | None = None,
        group: str | None = None, run_name: str | None = None, announce: bool = True, given: Given = Given(),
        **hooks) -> dict:
    """Train, write the run folder after every epoch, evaluate on test; return the summary.

    ``resume`` continues the run folder it names with its saved config (``overrides``
    may change only the keys in ``rundir.RESUME_FREE_KEYS``; the training data must be the
    same); a finished run is not trained again: its closing lines are printed once more.
    ``group``/``run_name`` place a new run folder (default: the dataset and a name made
    from the settings). ``announce=False`` leaves out the closing lines (a sweep prints its
    own). ``given`` (a :class:`~dpvision.jobs.setup.Given`): the splits and the ``nn.Module`` (trained in
    place) that replace what ``config`` names (:mod:`dpvision.api`). ``hooks``: the fields of :class:`Hooks`
    (``front_end``, ``on_rows``, ``summary_extra``, ``hook``).
    A ``KeyboardInterrupt`` leaving this function carries ``run_dir``: the folder to resume
    (``None`` before it was created). With ``run.max_minutes`` a sitting may end before the last epoch: then
    the return is :meth:`Trainer.paused_summary` (``"status": "paused"``) and ``resume`` continues the run.
    """
    hooks = Hooks(**hooks)  # an unknown name is a TypeError, not silently ignored
    device_name = (overrides or {}).get("run.device") or (config.run.device if config is not None else "auto")
    # Under torchrun: one process per GPU (or CPU rank); alone: a world of one, today's code path.
    with DistContext.from_env(device=device_name) as dist:
        trainer = Trainer(config, dist, hooks, resume=resume, overrides=overrides, given=given)
        try:
            trainer.open(group=group, run_name=run_name)
            complete = trainer.resumed and trainer.finished
            # A full disk before the first completed epoch removes a new run folder (runs.RunDir).
            with (trainer.run_dir.removed_on_write_failure() if trainer.run_dir is not None
                  else contextlib.nullcontext()):
                if not complete:
                    trainer.fit()
                summary = (trainer.paused_summary() if trainer.paused else
                           trainer.completed() if complete else trainer.finish())
            outputs = run_outputs(trainer.run_dir) if trainer.run_dir is not None else []
        except KeyboardInterrupt as interrupt:
            interrupt.run_dir = trainer.path  # the front-end's Ctrl-C line names the folder to --resume
            raise
        finally:
            trainer.close()
    if announce and dist.is_main and trainer.paused:
        print(report.paused_line(summary), flush=True)
    elif announce and dist.is_main:
        if complete:
            print(report.complete_line(trainer.path, trainer.epoch, trainer.stop_reason), flush=True)
        print(report.final_line(summary, outputs), flush=True)
    return summary


__all__ = ["BEST_MODEL", "Given", "Hooks", "Trainer", "evaluate_split", "run", "train"]

"""The one training job: any dataset, any model, either engine, baseline or DP-SGD.

Reads like Opacus's ``examples/mnist.py``: :func:`train` runs one epoch,
:func:`evaluate_split` measures a split, :func:`run` ties them together. DP is
the single ``dp=`` argument of the engine (:func:`dpvision.jobs.setup.build`);
the baseline is the same config with ``config.deactivated()``.

Run folder ``<runs_dir>/<group>/<run_name>/`` (group: the dataset, or the seed job's name)::

    config.yaml    the recipe that ran (a valid ``--config``) plus ``resolved``: σ, q, δ, N, data fingerprint
    metrics.csv    append-only, one row per epoch (loss/accuracy per split, ε under every accountant, seconds)
    summary.json   test accuracy overall, per class and per group; ε, δ, σ, q, steps; versions, wall time
    model.pt       weights after the last epoch (``model_best.pt`` too with ``run.select: best_val``)
    curves.png     accuracy and ε per epoch
    checkpoint.pt  everything ``--resume`` needs (model, optimizer, every generator, the privacy ledger)

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
from dataclasses import replace
from pathlib import Path
from typing import Callable

from dpvision.jobs.config import TrainConfig
from dpvision.jobs.ema import WeightAverage
from dpvision.jobs.loop import EPSILON_COLUMNS, EpochOutcome, train_private_epoch
from dpvision.jobs.report import epoch_line, final_line, group_accuracy, summarize
from dpvision.jobs.rundir import RESUME_FREE_KEYS, open_run, restore
from dpvision.jobs.setup import build, few_steps_advice, load_data, plan_privacy

METRIC_COLUMNS = [
    "epoch", "steps", "sample_rate", "noise_multiplier", "max_grad_norm", "train_loss", "train_accuracy",
    "val_loss", "val_accuracy", "test_loss", "test_accuracy", "epsilon", "delta", "seconds", "accountant",
    *EPSILON_COLUMNS,
]
BEST_MODEL = "model_best.pt"
CURVES = "curves.png"
Hook = Callable[[str, int], None]  # ("step", steps so far this epoch) / ("epoch", epoch): tests interrupt here


def train(engine, ledger, epoch: int, plan, budget, *, quiet: bool, hook: Hook | None = None) -> EpochOutcome:
    """One epoch behind a progress bar over steps, cut short by the privacy budget if it must be."""
    from tqdm import tqdm

    with tqdm(total=engine.steps_per_epoch, desc=f"Epoch {epoch}", unit="step", leave=False, disable=quiet,
              file=sys.stderr) as bar:
        done = 0  # counted here: a disabled tqdm does not count

        def progress(steps: int) -> None:
            nonlocal done
            bar.update(steps)
            done += steps
            if hook:
                hook("step", done)

        return train_private_epoch(engine, ledger, noise_multiplier=plan.noise_multiplier, budget=budget,
                                   progress=progress)


def evaluate_split(model, data, config: TrainConfig, device) -> tuple[float, float, object]:
    """Mean loss, accuracy and predictions [N] of ``model`` on one split (NaNs when there is none)."""
    from dpvision.engines import evaluate

    if data is None:
        return math.nan, math.nan, None
    return evaluate(model, data, batch_size=config.optim.eval_batch_size, device=device)


def validate(config: TrainConfig, dist=None, data=None, model=None):
    """Every check that can fail before anything is written; returns ``(data, plan, device)``.

    ``dist``: the data-parallel context; its device is this rank's (``cuda:LOCAL_RANK`` under torchrun).
    ``data``, ``model``: the splits and the module handed over from Python (:mod:`dpvision.api`) instead of
    those ``config`` names.
    """
    from dpvision.cli_support import resolve_device
    from dpvision.models import check_model_options
    from dpvision.models.external import check_external, is_external

    if config.run.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("run.tensorboard needs the tensorboard package: pip install 'dpvision[tensorboard]'")
    device = resolve_device(config.run.device)  # refuses cuda where there is none (one line, not a traceback)
    if dist is not None:
        device = dist.device
    data = load_data(config) if data is None else data
    if model is None and is_external(config.model.name):  # torchvision:<name> or <module>:<factory>
        check_external(config.model.name, image_size=int(data.train.images.shape[-1]))
    elif model is None:  # (the caller's own module was checked by dpvision.api)
        check_model_options(config.model.name, in_channels=int(data.train.images.shape[1]),
                            num_classes=len(data.class_names), image_size=int(data.train.images.shape[-1]),
                            activation=config.model.activation, width=config.model.width,
                            weight_standardization=config.model.weight_standardization)
    plan = plan_privacy(config, num_train=len(data.train))
    return data, plan, device


def run(config: TrainConfig | None = None, *, resume: str | os.PathLike | None = None, group: str | None = None,
        run_name: str | None = None, overrides: dict | None = None,
        front_end: Callable[[dict], dict] | None = None, announce: bool = True,
        on_rows: Callable[[object, list[dict]], None] | None = None, hook: Hook | None = None,
        data=None, model=None) -> dict:
    """Train, write the run folder after every epoch, evaluate on test; return the summary.

    ``resume`` continues the run folder it names with its saved config (``overrides``
    may change only the keys in ``RESUME_FREE_KEYS``; the training data must be the
    same). ``group``/``run_name`` place a new run folder (default: the dataset and a
    name made from the settings). ``front_end(resolved) -> dict`` lets a seed front-end
    record its own outputs in ``config.yaml`` (``resolved.front_end``; a ``run_name`` there
    is the default folder name). ``announce=False`` leaves out the closing summary lines (a sweep
    prints its own). ``on_rows(run_dir, rows)`` is called whenever
    ``metrics.csv`` changes (the MNIST seed derives its CSV there). ``data`` (a ``setup.Data``) and
    ``model`` (an ``nn.Module``, trained in place) replace what ``config`` names (:mod:`dpvision.api`).
    """
    from dpvision.engines.distributed import DistContext

    device_name = (overrides or {}).get("run.device") or (config.run.device if config is not None else "auto")
    # Under torchrun: one process per GPU (or CPU rank); alone: a world of one, today's code path.
    with DistContext.from_env(device=device_name) as dist:
        return _run(config, dist, resume=resume, group=group, run_name=run_name, overrides=overrides,
                    front_end=front_end, announce=announce, on_rows=on_rows, hook=hook, given=(data, model))


def _run(config, dist, *, resume, group, run_name, overrides, front_end, announce, on_rows, hook, given) -> dict:
    from dpvision.privacy import PrivacyLedger
    from dpvision.seeding import seed_everything

    if resume is not None:  # rank 0 reads the run folder (on another node there may be none)
        config, saved = dist.broadcast_object(restore(resume, overrides or {}) if dist.is_main else None)
        sigma = float(saved["noise_multiplier"])  # exactly as the run used it (no recalibration)
        if config.dp.enabled:
            config_for_plan = replace(config, dp=replace(config.dp, target_epsilon=None, noise_multiplier=sigma))
        else:
            config_for_plan = config
        data, plan, device = validate(config_for_plan, dist, *given)
        if data.fingerprint != saved.get("data_fingerprint"):
            raise ValueError(f"data.root {config.data.root!r} does not hold the training data the run in "
                             f"{str(resume)!r} was trained on (fingerprint {data.fingerprint[:12]}... vs "
                             f"{str(saved.get('data_fingerprint'))[:12]}...); point it at the original data")
    else:
        assert config is not None, "give a config or a run folder to resume"
        from dpvision.cli_support import check_can_create_dir

        # Before loading any data (creates nothing); rank 0 tries, every rank gets its verdict.
        problem = None
        if dist.is_main:
            try:
                check_can_create_dir(config.run.runs_dir, "run.runs_dir")
            except ValueError as err:
                problem = str(err)
        problem = dist.broadcast_object(problem)
        if problem:
            raise ValueError(problem)
        data, plan, device = validate(config, dist, *given)
        advice = few_steps_advice(config, plan)
        if advice and not config.run.quiet and dist.is_main:
            print(f"warning: {advice}", file=sys.stderr, flush=True)

    seed_everything(config.run.seed)  # weight initialisation draws from torch's global generator
    engine = build(config, data, plan, device, dist, model=given[1])
    ledger = PrivacyLedger()
    ema = None
    if config.optim.ema_decay is not None:
        ema = WeightAverage(engine.model, config.optim.ema_decay)
        ema.attach(getattr(engine.optimizer, "original_optimizer", engine.optimizer))  # under Opacus: the inner one
    run_dir = checkpointer = None  # only rank 0 writes the run folder
    if dist.is_main:
        run_dir, checkpointer = open_run(config, plan, data, engine, device, resume=resume, group=group,
                                         run_name=run_name, front_end=front_end, columns=METRIC_COLUMNS)
    run_path = dist.broadcast_object(str(run_dir.path) if run_dir else None)
    try:
        summary = _train_run(config, data, plan, device, engine, ledger, ema, run_dir, checkpointer, dist,
                             run_path, resume=resume, on_rows=on_rows, hook=hook)
    finally:
        if run_dir is not None:
            run_dir.unlock()
    if announce and dist.is_main:
        print(final_line(summary), flush=True)
    return summary


def judged(ema: WeightAverage | None, model):
    """The weights evaluation sees: the moving average when there is one, else the model's own."""
    return ema.applied() if ema is not None else contextlib.nullcontext(model)


def _restore(engine, ledger, checkpointer, dist) -> dict | None:
    """Rank 0 reads the checkpoint; every rank loads it (the engine scatters each rank's generators)."""
    state = checkpointer.read("cpu") if dist.is_main else None  # generator states must stay on the CPU
    if not dist.broadcast_object(state is not None):
        return None
    engine.load_state_dict(state["engine"] if dist.is_main else None)
    shared = dist.broadcast_object({k: state[k] for k in ("epoch", "steps", "ledger", "extra")} if dist.is_main
                                   else None)
    ledger.load_state_dict(shared["ledger"])
    return shared


def _train_run(config, data, plan, device, engine, ledger, ema, run_dir, checkpointer, dist, run_path, *, resume,
               on_rows, hook) -> dict:
    from dpvision.jobs.loop import epsilon_columns
    from dpvision.jobs.report import TensorBoardLog
    from dpvision.privacy import PrivacyBudget
    from dpvision.runs import atomic_torch_save

    state = _restore(engine, ledger, checkpointer, dist) if resume is not None else None
    extra = state["extra"] if state else {}
    rows: list[dict] = list(extra.get("metrics", []))
    stop_reason: str | None = extra.get("stop_reason")
    best_epoch, best_val = int(extra.get("best_epoch", 0)), float(extra.get("best_val_accuracy", -math.inf))
    best_state: dict | None = extra.get("best_state")
    if ema is not None and "ema" in extra:
        ema.load_state_dict(extra["ema"])
    start_epoch = state["epoch"] + 1 if state else 1
    main = dist.is_main
    if resume is not None and main:  # the folder holds exactly the checkpointed epochs
        run_dir.rewrite_metrics(rows)
        if best_state is not None:
            atomic_torch_save(best_state, run_dir.path / BEST_MODEL)
        if on_rows and rows:
            on_rows(run_dir, rows)
    budget = None
    if plan.dp and config.dp.max_epsilon is not None:
        budget = PrivacyBudget(max_epsilon=config.dp.max_epsilon, delta=plan.delta, accountant=config.dp.accountant)
    tensorboard = TensorBoardLog(run_dir.path) if config.run.tensorboard and main else None
    quiet = config.run.quiet or not main  # one voice: rank 0's
    if not quiet:
        mode = "no DP (baseline)" if not plan.dp else (
            f"DP-SGD: sigma={plan.noise_multiplier:.6g}, C={plan.max_grad_norm:g}, q={plan.sample_rate:.6g}, "
            f"{plan.steps_per_epoch} steps/epoch, delta={plan.delta:.3g}, {config.dp.accountant} accountant")
        verb = f"Resuming at epoch {start_epoch}:" if resume is not None else "Training"
        ranks = f" x {dist.world_size} processes" if dist.is_distributed else ""
        print(f"{verb} {config.model.name} on {plan.num_train} {config.data.dataset} images on {device}{ranks} "
              f"[{engine.name} engine] with {mode}; run folder {run_dir.path}", flush=True)

    started = time.perf_counter()
    for epoch in range(start_epoch, config.optim.epochs + 1):
        if stop_reason is not None:
            break
        epoch_start = time.perf_counter()
        outcome = train(engine, ledger, epoch, plan, budget, quiet=quiet, hook=hook)
        stop_reason = outcome.stop_reason
        if outcome.result is None:  # not one step fits in the budget: no epoch to report
            break
        result = outcome.result
        epsilons = epsilon_columns(ledger, delta=plan.delta, dp=plan.dp, primary=config.dp.accountant)
        with judged(ema, engine.model) as model:
            val_loss, val_accuracy, _ = evaluate_split(model, data.val, config, device)
            test_loss, test_accuracy = math.nan, math.nan
            if config.run.test_every_epoch:
                test_loss, test_accuracy, _ = evaluate_split(model, data.test, config, device)
            improved = config.run.select == "best_val" and val_accuracy > best_val
            if improved:
                best_epoch, best_val = epoch, val_accuracy
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        rows.append({
            "epoch": epoch, "steps": ledger.steps if plan.dp else epoch * engine.steps_per_epoch,
            "sample_rate": plan.sample_rate, "noise_multiplier": plan.noise_multiplier,
            "max_grad_norm": plan.max_grad_norm, "train_loss": result.loss, "train_accuracy": result.accuracy,
            "val_loss": val_loss, "val_accuracy": val_accuracy, "test_loss": test_loss,
            "test_accuracy": test_accuracy, "epsilon": epsilons[f"epsilon_{config.dp.accountant}"],
            "delta": plan.delta, "seconds": round(time.perf_counter() - epoch_start, 3),
            "accountant": config.dp.accountant, **epsilons,
        })
        # Checkpoint first, then write and print: nothing about an epoch is released
        # before the state that produced it is saved (docs/privacy.md). Every rank takes the
        # engine's state (it gathers every rank's generators); rank 0 writes it.
        engine_state = engine.state_dict()
        if not main:
            continue
        checkpointer.save(engine=engine, ledger=ledger, epoch=epoch, steps=ledger.steps, engine_state=engine_state,
                          extra={"metrics": rows, "stop_reason": stop_reason, "best_epoch": best_epoch,
                                 "best_val_accuracy": best_val, "best_state": best_state,
                                 **({"ema": ema.state_dict()} if ema is not None else {})})
        if improved:
            atomic_torch_save(best_state, run_dir.path / BEST_MODEL)
        run_dir.append_metrics(rows[-1])
        if on_rows:
            on_rows(run_dir, rows)
        if tensorboard:
            tensorboard.log(rows[-1])
        if not quiet:
            print(epoch_line(rows[-1], improved=improved, dp=plan.dp), flush=True)
        if hook:
            hook("epoch", epoch)
    if stop_reason is not None and not quiet:
        print(f"Stopped early: {stop_reason}", flush=True)
    if tensorboard:
        tensorboard.close()
    with judged(ema, engine.model) as model:
        summary = _finish(config, data, plan, device, engine, model, ledger, run_dir, run_path, rows, stop_reason,
                          resume, best_epoch, best_val, best_state, started)
    dist.barrier()  # the others wait until rank 0 has written everything
    return summary


def _finish(config, data, plan, device, engine, model, ledger, run_dir, run_path, rows, stop_reason, resume,
            best_epoch, best_val, best_state, started) -> dict:
    """Save the final weights, judge the selected ones on the test set, write summary and plot (rank 0)."""
    from dpvision.jobs.loop import epsilon_columns
    from dpvision.jobs.plots import plot_curves

    if run_dir is not None:
        run_dir.save_model(model)  # model.pt: the last epoch (its moving average with optim.ema_decay)
    test_accuracy_last = None
    if config.run.select == "best_val" and best_state is not None:
        if config.run.evaluate_test:
            _, test_accuracy_last, _ = evaluate_split(model, data.test, config, device)
        model.load_state_dict(best_state)  # training is over: judge the selected weights
    per_class = per_group = None
    test_loss, test_accuracy = math.nan, math.nan
    if config.run.evaluate_test:
        test_loss, test_accuracy, predictions = evaluate_split(model, data.test, config, device)
        labels = data.test.labels
        per_class = group_accuracy(predictions, labels, [data.class_names[int(y)] for y in labels])
        per_group = group_accuracy(predictions, labels, list(data.test_groups)) if data.test_groups else None
    epsilons = epsilon_columns(ledger, delta=plan.delta, dp=plan.dp, primary=config.dp.accountant)
    summary = summarize(config, plan, data, engine, device, rows, epsilons, test_loss=test_loss,
                        test_accuracy=test_accuracy, per_class=per_class, per_group=per_group,
                        test_accuracy_last=test_accuracy_last, best_epoch=best_epoch, best_val=best_val,
                        stop_reason=stop_reason, resumed=resume is not None,
                        steps=ledger.steps if plan.dp else len(rows) * engine.steps_per_epoch,
                        wall_seconds=time.perf_counter() - started, run_dir=run_path)
    if plan.dp:
        summary["epsilon_notes"] = ledger.epsilon_notes(delta=plan.delta)  # why an accountant says inf, if one does
    if run_dir is None:  # not rank 0
        return summary
    title = f"{config.data.dataset} / {config.model.name}: " + (
        f"σ={plan.noise_multiplier:.3g}, C={plan.max_grad_norm:g}, q={plan.sample_rate:.3g}, δ={plan.delta:.2g}"
        if plan.dp else "no DP")
    plot_curves(rows, Path(run_dir.path) / CURVES, title=title)
    run_dir.write_summary(summary)
    return summary


__all__ = ["BEST_MODEL", "CURVES", "METRIC_COLUMNS", "RESUME_FREE_KEYS", "evaluate_split", "run", "train",
           "validate"]

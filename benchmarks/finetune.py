"""Fine-tuning from a checkpoint on real data, against training from scratch at the same ε (issue 22).

Three parts, each a run of the ordinary training job (:func:`dpvision.jobs.train.run`) in a run folder
under ``--out``; a finished run is skipped and an interrupted one continues from its checkpoint, so the
same command, re-run after a cut, finishes what is left:

1. **pretrain**: the model (``--model``, default ``torchvision:resnet18`` made DP-compatible: GroupNorm)
   trained without privacy on the public dataset (``--pretrain-dataset``, default Fashion-MNIST); its test
   accuracy is evaluated once, at the end; its ``model.pt`` (a ``state_dict``) is the checkpoint.
2. **tune**: on the private dataset (``--dataset``, default MNIST) at ``--epsilon`` (σ calibrated to it),
   three ways to train: from scratch (all layers), from the checkpoint (``model.init``, all layers), and
   from the checkpoint as a linear probe (``model.finetune: linear_probe``), each at every learning rate of
   ``--lrs``; judged on a validation split of ``--val-size`` images carved from the training set (seeded),
   the test set never evaluated (``run.evaluate_test: false``).
3. **final**: each way at its best learning rate, on the whole training set, the test set evaluated once,
   at the end.

Writes ``--json`` (default ``--out/finetune.json``) and, with ``--write-docs`` (or later ``--docs-only``),
the table between ``<!-- accuracy:finetune -->`` and ``<!-- /accuracy:finetune -->`` of ``docs/accuracy.md``
(``--smoke`` results only into another file, ``--docs``). Data roots hold torchvision's layout:
``<root>/MNIST/raw/``, ``<root>/FashionMNIST/raw/``.

    python benchmarks/finetune.py --data-root .carry/mnist --pretrain-root .carry/fmnist --device cuda --write-docs
    python benchmarks/finetune.py --docs-only --json finetune.json     # the docs from a results file
    python benchmarks/finetune.py --data-root /tmp/mnist --pretrain-root /tmp/fmnist --device cpu --smoke \\
        --out /tmp/finetune_smoke --write-docs --docs /tmp/accuracy_copy.md
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

from accuracy import config_id, train_once
from accuracy_docs import DOCS, marked
from accuracy_plan import REPO

from dpvision.jobs.config import TrainConfig
from dpvision.runs import atomic_write_json, atomic_write_text

WAYS = {  # name -> (starts from the checkpoint, model.finetune)
    "scratch": (False, "all"),
    "finetune_all": (True, "all"),
    "linear_probe": (True, "linear_probe"),
}
LABELS = {"scratch": "from scratch, all layers", "finetune_all": "from the checkpoint, all layers",
          "linear_probe": "from the checkpoint, linear probe (last layer only)"}
SMOKE = {"k": 256, "val_size": 64, "epochs": 1, "pretrain_epochs": 1, "batch_size": 32, "lrs": "0.5,2"}
MARKER = "finetune"


def base_config(args, dataset: str, root: str) -> TrainConfig:
    """What every run shares: the model, the machine, the data (never downloaded), quiet, test at the end."""
    return TrainConfig().with_overrides({
        "data.dataset": dataset, "data.root": str(root), "data.download": False, "data.k": args.k,
        "model.name": args.model, "optim.batch_size": args.batch_size, "optim.momentum": 0.0,
        "run.device": args.device, "run.seed": args.seed, "run.quiet": True, "run.test_every_epoch": False,
        "run.runs_dir": str(args.out / "runs")})


def named(config: TrainConfig, name: str) -> TrainConfig:
    """``config`` in the run folder ``<name>_<config_id>``: a changed setting never reuses an old run."""
    return config.with_overrides({"run.run_name": f"{name}_{config_id(config)}"})


def pretrain_config(args) -> TrainConfig:
    return named(base_config(args, args.pretrain_dataset, args.pretrain_root).with_overrides({
        "dp.enabled": False, "optim.epochs": args.pretrain_epochs, "optim.lr": args.pretrain_lr,
        "optim.momentum": 0.9, "optim.batch_size": args.pretrain_batch_size}), "pretrain")


def dp_config(args, way: str, lr: float, *, tune: bool, checkpoint: Path) -> TrainConfig:
    """A DP run of ``way`` at ``lr``: σ calibrated to ``--epsilon``; tuning on the validation split, no test."""
    from_checkpoint, finetune = WAYS[way]
    overrides = {"dp.enabled": True, "dp.target_epsilon": args.epsilon, "dp.noise_multiplier": None,
                 "dp.max_grad_norm": args.max_grad_norm, "optim.epochs": args.epochs, "optim.lr": lr,
                 "model.finetune": finetune, "data.val_size": args.val_size if tune else 0,
                 "run.evaluate_test": not tune}
    if from_checkpoint:
        overrides["model.init"] = str(checkpoint.resolve())
    config = base_config(args, args.dataset, args.data_root).with_overrides(overrides)
    return named(config, f"{'tune' if tune else 'final'}_{way}_lr{lr:g}")


def run_folder(config: TrainConfig) -> Path:
    folder = Path(config.run.runs_dir) / config.run.run_name
    train_once(config, folder)
    return folder


def last_row(folder: Path) -> dict:
    with open(folder / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))[-1]


def outcome(folder: Path, config: TrainConfig) -> dict:
    """What one finished run reports (the test numbers only where the run evaluated the test set)."""
    summary = json.loads((folder / "summary.json").read_text())
    row = last_row(folder)
    return {"run": str(folder), "lr": config.optim.lr, "epochs": summary["epochs_completed"],
            "num_train": summary["num_train"], "val_accuracy": float(row["val_accuracy"]),
            "test_accuracy": summary["test_accuracy"] if config.run.evaluate_test else None,
            "epsilon": summary.get("epsilon"), "delta": summary.get("delta"),
            "noise_multiplier": summary.get("noise_multiplier"), "seconds": summary["wall_seconds"]}


def phases(args) -> dict:
    """Pretrain, tune every way at every lr, train the chosen ones once more on everything: the results."""
    start = time.time()
    pre = pretrain_config(args)
    pre_folder = run_folder(pre)
    pre_out = outcome(pre_folder, pre)
    print(f"pretrain: {args.pretrain_dataset} non-private, test accuracy {pre_out['test_accuracy']:.4f}", flush=True)
    lrs = [float(v) for v in args.lrs.split(",")]
    tuning, final = {}, {}
    for way in WAYS:
        tried = []
        for lr in lrs:
            config = dp_config(args, way, lr, tune=True, checkpoint=pre_folder / "model.pt")
            tried.append(outcome(run_folder(config), config))
            print(f"tune {way:13s} lr {lr:g}: val accuracy {tried[-1]['val_accuracy']:.4f} "
                  f"(ε {tried[-1]['epsilon']:.3g})", flush=True)
        best = max(tried, key=lambda r: r["val_accuracy"])  # ties: the first (smaller lr)
        tuning[way] = {"tried": tried, "best_lr": best["lr"], "best_val_accuracy": best["val_accuracy"]}
        config = dp_config(args, way, best["lr"], tune=False, checkpoint=pre_folder / "model.pt")
        final[way] = outcome(run_folder(config), config)
        print(f"final {way:13s} lr {best['lr']:g}: test accuracy {final[way]['test_accuracy']:.4f} "
              f"(ε {final[way]['epsilon']:.3g})", flush=True)
    return {"command": args.command, "device": args.device, "smoke": args.smoke, "model": args.model,
            "pretrain_dataset": args.pretrain_dataset, "dataset": args.dataset, "target_epsilon": args.epsilon,
            "lrs": lrs, "configurations_tried": len(lrs) * len(WAYS), "val_size": args.val_size,
            "epochs": args.epochs, "batch_size": args.batch_size, "max_grad_norm": args.max_grad_norm,
            "pretrain": pre_out, "pretrain_epochs": args.pretrain_epochs, "tuning": tuning, "final": final,
            "seconds_this_invocation": time.time() - start}


def table(results: dict) -> str:
    """The docs section: the command, how the choice was made, one row per way."""
    pre = results["pretrain"]
    lines = ["```", results["command"], "```",
             f"Device: {results['device']}. Model: `{results['model']}`. "
             f"Checkpoint: {results['pretrain_epochs']} epochs on {results['pretrain_dataset']} without privacy "
             f"(test accuracy {pre['test_accuracy']:.4f}), its `model.pt` given as `model.init`. "
             f"Private data: {results['dataset']}, target ε = {results['target_epsilon']:g}, "
             f"{results['epochs']} epochs, B = {results['batch_size']}, C = {results['max_grad_norm']:g}. "
             f"Learning rates tried per way: {', '.join(f'{v:g}' for v in results['lrs'])} "
             f"({results['configurations_tried']} runs in all), judged on a validation split of "
             f"{results['val_size']} training images (test set not evaluated); the chosen one trained again "
             "on the whole training set, the test set evaluated once.", "",
             "| way | lr (chosen) | val acc (tuning) | test acc | ε (δ) | σ |",
             "| --- | --- | --- | --- | --- | --- |"]
    for way, row in results["final"].items():
        lines.append(f"| {LABELS[way]} | {row['lr']:g} | {results['tuning'][way]['best_val_accuracy']:.4f} | "
                     f"{row['test_accuracy']:.4f} | {row['epsilon']:.3f} ({row['delta']:g}) | "
                     f"{row['noise_multiplier']:.3f} |")
    return "\n".join(lines) + "\n"


def write_docs(results: dict, docs: Path) -> None:
    if results["smoke"] and docs.resolve() == DOCS.resolve():
        raise SystemExit("finetune.py: error: --smoke results go only into another file: give --docs OTHER.md")
    if not docs.is_file():
        raise SystemExit(f"finetune.py: error: --docs {docs}: no such file (a copy of docs/accuracy.md)")
    atomic_write_text(docs, marked(docs.read_text(encoding="utf-8"), MARKER, table(results)))
    print(f"wrote {docs}")


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--model", default="torchvision:resnet18")
    add("--dataset", default="mnist", help="the private dataset (fine-tuned on with DP)")
    add("--data-root", help="its root (holds MNIST/raw/ for mnist)")
    add("--pretrain-dataset", default="fashion-mnist", help="the public dataset (pretrained on without DP)")
    add("--pretrain-root", help="its root (holds FashionMNIST/raw/ for fashion-mnist)")
    add("--epsilon", type=float, default=1.0, help="target ε of every DP run (δ: the job's default)")
    add("--lrs", default="0.5,1,2,4", help="learning rates tried for each way (SGD, no momentum)")
    add("--epochs", type=int, default=5)
    add("--batch-size", type=int, default=1024, help="expected (Poisson) batch size of the DP runs")
    add("--max-grad-norm", type=float, default=1.0)
    add("--val-size", type=int, default=5000, help="validation images carved from the training set for tuning")
    add("--pretrain-epochs", type=int, default=5)
    add("--pretrain-lr", type=float, default=0.01, help="SGD with momentum 0.9 (0.1 diverges: 10%% on Fashion-MNIST)")
    add("--pretrain-batch-size", type=int, default=256)
    add("--k", type=int, default=None, help="train on a seeded subset of K images of each dataset")
    add("--seed", type=int, default=0)
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--out", type=Path, default=REPO / "benchmarks" / "results" / "finetune")
    add("--smoke", action="store_true", help=f"tiny sizes ({SMOKE}) to check the script on a CPU")
    add("--json", type=Path, default=None, help="the results file (default: --out/finetune.json)")
    add("--write-docs", action="store_true", help="fill the finetune table of --docs from the results")
    add("--docs-only", action="store_true", help="train nothing: fill --docs from the results file --json")
    add("--docs", type=Path, default=DOCS)
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/finetune.py", *argv])
    args.json = args.json or args.out / "finetune.json"
    if not args.docs_only and not (args.data_root and args.pretrain_root):
        p.error("--data-root and --pretrain-root are required (unless --docs-only)")
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.docs_only:
        write_docs(json.loads(args.json.read_text()), args.docs)
        return 0
    results = phases(args)
    atomic_write_json(args.json, results)
    print(f"wrote {args.json}")
    if args.write_docs:
        write_docs(results, args.docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

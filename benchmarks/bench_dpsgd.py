"""Seconds per epoch: the stock Opacus recipe against dpvision's fast engine, DP and non-private.

Workloads: SampleConvNet on MNIST (60,000 train images) and CelebaCNN on 64x64 RGB
(random but fixed uint8 images, ``--celeba-size`` of them), batch 256, plus the
fast engine at a large logical batch (``--large-batch``, default 4096).

The stock recipe is what Opacus's examples teach: torchvision's ``datasets.MNIST``
with ``ToTensor`` + ``Normalize`` (for CelebA-64, a map-style dataset normalising
each item) in a ``DataLoader``, ``PrivacyEngine().make_private`` (Poisson sampling,
hook-based per-sample gradients), one optimizer step a batch. Non-private: the
same loader shuffled, plain SGD.

Each configuration: one warm-up run of a few steps (not timed; graph capture and
cuDNN autotuning happen there), then ``--epochs`` timed runs; on the CPU (or with
``--interleave``) the timed runs go round-robin over all configurations of a
workload, so that a shared machine's changing load hits all of them alike. With ``--max-steps``
a timed run stops after that many steps and the time is extrapolated to a full
epoch (seconds / steps x steps per epoch); the table says so. Reported: median
seconds per epoch, peak memory (CUDA max_memory_allocated on GPU; peak RSS of
the process while the configuration ran, on CPU).

    python benchmarks/bench_dpsgd.py --device cuda --data-root data --epochs 3 --json gpu.json
    python benchmarks/bench_dpsgd.py --device cpu --max-steps 20 --epochs 2 --json cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dpvision.data.mnist import load_mnist
from dpvision.data.tensors import ImageTensors, NormalizedTensorDataset
from dpvision.models import CelebaCNN, SampleConvNet
from dpvision.privacy.accounting import poisson_sample_rate, steps_per_epoch
from dpvision.engines import DPSettings, OptimizerSpec
from dpvision.engines.fast import FastEngine

DP = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
BASELINE_OPTIONS = {"precision": "fp32", "channels_last": False, "pad_sigmas": 3.0}
LR = 0.1


class PeakMemory:
    """Peak memory of one configuration: CUDA max_memory_allocated, or the process's RSS sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak, self._stop = self._rss(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
            self.mb = self.peak / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- stock recipe
class StockRecipe:
    """Opacus as its examples use it: a DataLoader, make_private, hooks."""

    def __init__(self, model, dataset, batch_size: int, dp: bool, device: torch.device, workers: int) -> None:
        self.device = device
        model = model.to(device)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=not dp, num_workers=workers,
                            pin_memory=device.type == "cuda")
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        if dp:
            from opacus import PrivacyEngine

            model, optimizer, loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=DP.noise_multiplier, max_grad_norm=DP.max_grad_norm, poisson_sampling=True)
        self.model, self.optimizer, self.loader = model, optimizer, loader
        self.steps_per_epoch = len(loader)

    def run(self, max_steps: int | None) -> int:
        self.model.train()
        steps = 0
        for images, labels in self.loader:
            if max_steps is not None and steps >= max_steps:
                break
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(images), labels).backward()
            self.optimizer.step()
            steps += 1
        sync(self.device)
        return steps


class FastRecipe:
    def __init__(self, model, data: ImageTensors, batch_size: int, dp: bool, device: torch.device,
                 mode: str | None, graphs: bool | None, options: dict | None = None) -> None:
        self.device = device
        self.engine = FastEngine(model=model, train_data=data, batch_size=batch_size,
                                 optimizer=OptimizerSpec(lr=LR), dp=DP if dp else None, seed=0, device=device,
                                 grad_sample_mode=mode, cuda_graphs=graphs, **(options or {}))
        self.steps_per_epoch = self.engine.steps_per_epoch

    def run(self, max_steps: int | None) -> int:
        steps = self.engine.train_epoch(max_steps=max_steps).steps  # ends with a host sync (loss read)
        sync(self.device)
        return steps


def time_recipe(make, args, device: torch.device) -> dict:
    with PeakMemory(device) as mem:
        recipe = make()
        recipe.run(min(args.warmup_steps, recipe.steps_per_epoch))
        times, extrapolated = [], False
        for _ in range(args.epochs):
            start = time.perf_counter()
            steps = recipe.run(args.max_steps)
            elapsed = time.perf_counter() - start
            extrapolated |= steps < recipe.steps_per_epoch
            times.append(elapsed / max(steps, 1) * recipe.steps_per_epoch)
    del recipe
    return {"seconds_per_epoch": statistics.median(times), "min_seconds_per_epoch": min(times), "all_seconds": times,
            "peak_memory_mb": mem.mb, "extrapolated": extrapolated}


def time_interleaved(makers, args, device: torch.device) -> list[dict]:
    """Round-robin: every configuration built and warmed up, then timed once per round, ``--epochs`` rounds.

    On a shared machine whose load changes by the minute, this exposes every
    configuration to the same conditions. Peak memory is then the process's peak
    RSS during that configuration's timed runs (other live configurations included).
    """
    recipes, rows = [], []
    for *_, make, run_args in makers:
        torch.manual_seed(0)
        recipe = make()
        recipe.run(min(args.warmup_steps, recipe.steps_per_epoch))
        recipes.append((recipe, run_args))
        rows.append({"all_seconds": [], "extrapolated": False, "peak_memory_mb": 0.0})
    for _ in range(args.epochs):
        for (recipe, run_args), row in zip(recipes, rows):
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                steps = recipe.run(run_args.max_steps)
                elapsed = time.perf_counter() - start
            row["extrapolated"] |= steps < recipe.steps_per_epoch
            row["all_seconds"].append(elapsed / max(steps, 1) * recipe.steps_per_epoch)
            row["peak_memory_mb"] = max(row["peak_memory_mb"], mem.mb)
    for row in rows:
        row["seconds_per_epoch"] = statistics.median(row["all_seconds"])
        row["min_seconds_per_epoch"] = min(row["all_seconds"])
    return rows


# ----------------------------------------------------------------------------- workloads
def mnist_workload(args):
    data = load_mnist(args.data_root, train=True)  # also decompresses the IDX files torchvision reads
    from torchvision import datasets, transforms

    stock = datasets.MNIST(args.data_root, train=True, download=False, transform=transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]))
    return data, stock, SampleConvNet


def celeba_workload(args):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.celeba_size, 3, 64, 64), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 2, (args.celeba_size,), generator=g)
    data = ImageTensors(images, labels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return data, NormalizedTensorDataset(data), CelebaCNN


def versions(device: torch.device) -> dict:
    import opacus
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "opacus": opacus.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version()
    else:
        out["cpu"] = platform.processor() or platform.machine()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--data-root", default="data")
    p.add_argument("--epochs", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop each timed run after this many steps and extrapolate to a full epoch")
    p.add_argument("--stock-max-steps", type=int, default=None, help="as --max-steps, for the stock recipe only")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--workloads", default="mnist,celeba64")
    p.add_argument("--engines", default="opacus,fast",
                   help="opacus,fast[,fast-fp32] (fast-fp32: the fast engine before the speed options)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--large-batch", type=int, default=4096, help="fast engine only; 0 to skip")
    p.add_argument("--celeba-size", type=int, default=20000)
    p.add_argument("--grad-sample-mode", default=None, choices=["vmap", "hooks", "manual"],
                   help="fast engine's per-sample gradient backend (default by device)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="fast engine: run every step eagerly")
    p.add_argument("--precision", default=None, choices=["fp32", "tf32", "bf16"],
                   help="fast engine on CUDA (default: the engine's DEFAULT_PRECISION)")
    p.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="fast engine on CUDA (default: the engine's DEFAULT_CHANNELS_LAST)")
    p.add_argument("--pad-sigmas", type=float, default=None, help="fast engine: chunk capacity E[B] + k sd")
    p.add_argument("--stock-workers", type=int, default=None, help="DataLoader workers (default 1 on cuda, 0 on cpu)")
    p.add_argument("--interleave", default=None, action=argparse.BooleanOptionalAction,
                   help="time configurations round-robin, one timed run each per round (default: on for cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for every engine (on a CPU shared with other jobs, 1 avoids "
                        "OpenMP oversubscription stalls)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    interleave = args.interleave if args.interleave is not None else device.type == "cpu"
    workers = args.stock_workers if args.stock_workers is not None else (1 if device.type == "cuda" else 0)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results = []
    for workload in args.workloads.split(","):
        data, stock_dataset, model_cls = {"mnist": mnist_workload, "celeba64": celeba_workload}[workload](args)
        configs = []
        for engine in args.engines.split(","):
            batches = [args.batch_size] + ([args.large_batch] if engine == "fast" and args.large_batch else [])
            for batch in batches:
                for dp in (True, False):
                    configs.append((engine, batch, dp))
        makers = []
        for engine, batch, dp in configs:
            if engine == "opacus":
                def make(batch=batch, dp=dp):
                    return StockRecipe(model_cls(), stock_dataset, batch, dp, device, workers)
                run_args = argparse.Namespace(**{**vars(args), "max_steps": args.stock_max_steps or args.max_steps})
            else:
                # "fast": the engine's defaults (or the flags); "fast-fp32": the engine before the
                # speed options (fp32 matmuls, NCHW, 3-sd padding), for a before/after in one run.
                options = (BASELINE_OPTIONS if engine == "fast-fp32" else
                           {k: v for k, v in (("precision", args.precision), ("channels_last", args.channels_last),
                                              ("pad_sigmas", args.pad_sigmas)) if v is not None})

                def make(batch=batch, dp=dp, options=options):
                    return FastRecipe(model_cls(), data, batch, dp, device, args.grad_sample_mode,
                                      False if args.no_cuda_graphs else None, options)
                run_args = args
            makers.append((engine, batch, dp, make, run_args))
        timed = time_interleaved(makers, args, device) if interleave else [
            time_recipe(make, run_args, device) for *_, make, run_args in makers]
        for (engine, batch, dp, _, _), timing in zip(makers, timed):
            row = {"workload": workload, "engine": engine, "dp": dp, "batch_size": batch, **timing}
            row["steps_per_epoch"] = (steps_per_epoch(poisson_sample_rate(len(data), batch)) if dp
                                      else math.ceil(len(data) / batch))
            results.append(row)
            print(f"  {workload:8s} {engine:6s} dp={dp!s:5s} B={batch:5d}: {row['seconds_per_epoch']:.4f} s/epoch"
                  f"{' (extrapolated)' if row['extrapolated'] else ''}, peak {row['peak_memory_mb']:.0f} MB",
                  flush=True)

    print_table(results, device, "seconds_per_epoch", "median")
    if args.epochs > 1:
        print_table(results, device, "min_seconds_per_epoch", "fastest run")
    if args.json:
        out = {"device": args.device, "date": datetime.date.today().isoformat(), "versions": versions(device),
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def print_table(results: list[dict], device: torch.device, key: str, label: str) -> None:
    def find(w, e, dp, b):
        return next((r for r in results if (r["workload"], r["engine"], r["dp"], r["batch_size"]) == (w, e, dp, b)),
                    None)

    print(f"\nDP-SGD seconds per epoch ({label} of the timed runs) on {device.type}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()},"
          f" {torch.get_num_threads()} threads); * = extrapolated from partial epochs")
    print(f"{'workload':9s} {'engine':9s} {'B':>6s} {'DP s/ep':>10s} {'nonDP s/ep':>11s} {'DP/nonDP':>9s}"
          f" {'DP MB':>8s} {'nonDP MB':>9s} {'stock/fast DP':>14s} {'stock/fast nonDP':>17s}")
    for r in results:
        if not r["dp"]:
            continue
        w, e, b = r["workload"], r["engine"], r["batch_size"]
        nd = find(w, e, False, b)
        stock_dp, stock_nd = find(w, "opacus", True, 256), find(w, "opacus", False, 256)

        def fmt(x):
            return f"{x[key]:.3f}{'*' if x['extrapolated'] else ''}" if x else "-"
        ratio_dp = (f"{stock_dp[key] / r[key]:.1f}x"
                    if e != "opacus" and stock_dp else "")
        ratio_nd = (f"{stock_nd[key] / nd[key]:.1f}x"
                    if e != "opacus" and stock_nd and nd else "")
        print(f"{w:9s} {e:9s} {b:6d} {fmt(r):>10s} {fmt(nd):>11s}"
              f" {(r[key] / nd[key]) if nd else float('nan'):8.2f}x"
              f" {r['peak_memory_mb']:8.0f} {nd['peak_memory_mb'] if nd else float('nan'):9.0f}"
              f" {ratio_dp:>14s} {ratio_nd:>17s}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())

"""Seconds per epoch and ms per step: stock Opacus, plain PyTorch and dpvision's fast engine, DP and not.

Workloads: SampleConvNet on MNIST (60,000 train images), CelebaCNN on 64x64 RGB
(random but fixed uint8 images, ``--celeba-size`` of them) and WideResNet-16-4
(GroupNorm, ``build_model("wrn16_4")``) on 32x32 RGB (random but fixed, ``--wrn-size``,
CIFAR-10's 50,000 by default, 10 classes), batch 256, plus the fast engine at a large
logical batch (``--large-batch``, default 4096).

Engines (``--engines``, per workload with ``--wrn-engines``):

* ``opacus``: the stock recipe Opacus's examples teach: torchvision's ``datasets.MNIST``
  with ``ToTensor`` + ``Normalize`` (otherwise a map-style dataset normalising each item)
  in a ``DataLoader``, ``PrivacyEngine().make_private`` (Poisson sampling, hooks), one
  optimizer step a batch. Non-private: the same loader shuffled, plain SGD.
* ``opacus-hooks``, ``opacus-ghost`` (DP only): Opacus 1.6's per-step work alone, from
  ``make_private(grad_sample_mode="hooks" | "ghost")``, fed by Poisson batches drawn on the
  device from the device-resident data (no DataLoader), loss and optimizer as Opacus wants.
* ``plain`` (non-private only): the yardstick, plain PyTorch eager: the same model and
  batch size, data on the device, shuffled batches, mean cross-entropy, ``backward``,
  ``torch.optim.SGD``; fp32 parameters and activations (cuDNN's default TF32 convolutions).
* ``fast``: ``FastEngine`` with its defaults (or the ``--precision``... flags);
  ``fast-fp32``: the engine before run 9's speed options; ``fast:key=value+key=value``: the
  defaults overridden (keys ``precision``, ``channels_last``, ``pad_sigmas``, ``bucket``
  (0: every chunk padded to the capacity), ``cudnn_benchmark``, ``cuda_graphs``,
  ``grad_sample_mode``, ``method``: the manual backend's norm method, ``keep_gb``: its keep budget in GiB, and
  the rest of ``FAST_KEYS``).

Each configuration: one warm-up run of a few steps (not timed; graph capture and
cuDNN autotuning happen there), then ``--epochs`` timed runs; on the CPU (or with
``--interleave``) the timed runs go round-robin over all configurations of a
workload, so that a shared machine's changing load hits all of them alike. With ``--max-steps``
a timed run stops after that many steps and the time is extrapolated to a full
epoch (seconds / steps x steps per epoch); the table says so. Reported: median
seconds per epoch and ms per step, peak memory (CUDA max_memory_allocated on GPU; peak
RSS of the process while the configuration ran, on CPU), and the achieved rate of
useful arithmetic: the FLOPs of one non-private forward + backward of the model at the
batch size (``torch.utils.flop_counter.FlopCounterMode``) per step time, next to the
GPU's matrix-multiply ceilings measured in the same run (TF32 and bf16, 8192^3).

    python benchmarks/bench_dpsgd.py --device cuda --data-root data --epochs 3 --json gpu.json
    python benchmarks/bench_dpsgd.py --device cuda --workloads wrn16_4 --max-steps 30 --large-batch 0
    python benchmarks/bench_dpsgd.py --device cpu --max-steps 20 --epochs 2 --json cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
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
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpvision.data.mnist import load_mnist
from dpvision.data.tensors import ImageTensors, NormalizedTensorDataset
from dpvision.models import CelebaCNN, SampleConvNet, build_model
from dpvision.privacy.accounting import poisson_sample_rate
from dpvision.privacy.plan import DPSettings, make_plan
from dpvision.engines import FastOptions, OptimizerSpec, group_norm
from dpvision.engines.fast import FastEngine

NOISE_MULTIPLIER, MAX_GRAD_NORM = 1.0, 1.0
BASELINE_OPTIONS = {"precision": "fp32", "channels_last": False, "pad_sigmas": 3.0}
LR = 0.1
FAST_KEYS = {"fuse": bool, "precision": str, "channels_last": bool, "pad_sigmas": float, "cuda_graphs": bool,
             "grad_sample_mode": str, "method": str, "bucket": int, "cudnn_benchmark": bool, "augmult": int,
             "physical_batch_size": int, "augment_flip": bool, "keep_gb": float, "gn_short_rows": int}
# keep_gb: the manual backend's budget (GiB of float32) for the per-example gradients pass 1 materialises and keeps
# for pass 2 (a matrix-vector product instead of a weight-gradient pass); library default 0.125 GiB, augmult on
# CUDA 1/16 of the card. With ``method=materialise`` and a budget above B x parameters it keeps every layer's.
# gn_short_rows: group_norm.SHORT_ROW_MAX for the row (per-example GroupNorm sums of rows of at most this many
# elements several rows a Triton program; 0: one program a row, the kernel before session 13); rows without it run
# the library's value. CUDA with Triton only (elsewhere the sums are PyTorch's whatever the value).
LIBRARY_SHORT_ROW_MAX = group_norm.SHORT_ROW_MAX


class PeakMemory:
    """Peak memory of one configuration: CUDA max_memory_allocated (less what was still allocated when it
    started: earlier configurations' leftovers), or the process's RSS sampled every 5 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self):
        gc.collect()  # hook and graph reference cycles of earlier configurations
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
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
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
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
                noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=True)
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


def fast_engine(model, data: ImageTensors, batch_size: int, *, dp: bool, device, options: dict | None = None,
                noise_multiplier: float = NOISE_MULTIPLIER, lr: float = LR) -> FastEngine:
    """The fast engine on ``data`` with batch size B (DP at σ, C = 1), ``options`` as FastOptions fields."""
    settings = DPSettings(noise_multiplier=noise_multiplier, max_grad_norm=MAX_GRAD_NORM)
    plan = make_plan(settings if dp else settings.deactivated(), num_train=len(data), batch_size=batch_size,
                     epochs=1)
    return FastEngine(model=model, train_data=data, plan=plan, optimizer=OptimizerSpec(lr=lr), seed=0, device=device,
                      options=FastOptions(**(options or {})))


class FastRecipe:
    def __init__(self, model, data: ImageTensors, batch_size: int, dp: bool, device: torch.device,
                 mode: str | None, graphs: bool | None, options: dict | None = None) -> None:
        self.device = device
        options = dict(options or {})
        method, keep_gb = options.pop("method", None), options.pop("keep_gb", None)
        short_rows = options.pop("gn_short_rows", None)  # read at every call: stays set while this row runs
        group_norm.SHORT_ROW_MAX = LIBRARY_SHORT_ROW_MAX if short_rows is None else int(short_rows)
        options.setdefault("grad_sample_mode", mode)
        options.setdefault("cuda_graphs", graphs)
        self.engine = fast_engine(model, data, batch_size, dp=dp, device=device, options=options)
        if method is not None and self.engine.backend is not None:
            self.engine.backend.method = method  # before the first chunk (and graph capture)
        if keep_gb is not None and dp:
            if not hasattr(self.engine.backend, "keep_budget"):
                raise ValueError(f"keep_gb needs the manual backend, not {self.engine.grad_sample_mode}")
            self.engine.backend.keep_budget = int(keep_gb * 2 ** 30) // 4  # before the first chunk and capture
        self.steps_per_epoch = self.engine.steps_per_epoch

    def run(self, max_steps: int | None) -> int:
        steps = self.engine.train_epoch(max_steps=max_steps).steps  # ends with a host sync (loss read)
        sync(self.device)
        return steps


class DeviceBatches:
    """The data on the device as uint8 and its normalisation, shared by the plain and Opacus-step recipes."""

    def __init__(self, data: ImageTensors, device: torch.device) -> None:
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.generator = torch.Generator(device).manual_seed(0)

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.images[idx].float().div_(255.0) - self.mean) / self.std, self.labels[idx]


class PlainRecipe:
    """The yardstick: plain PyTorch, non-private, eager, same model and batch size, data on the device."""

    def __init__(self, model, data: ImageTensors, batch_size: int, device: torch.device) -> None:
        self.device, self.batch_size = device, batch_size
        self.batches = DeviceBatches(data, device)
        self.model = model.to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.steps_per_epoch = math.ceil(len(data) / batch_size)

    def run(self, max_steps: int | None) -> int:
        self.model.train()
        n, b = len(self.batches), self.batch_size
        order = torch.randperm(n, device=self.device, generator=self.batches.generator)
        steps = self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch)
        for s in range(steps):
            x, y = self.batches.get(order[s * b:(s + 1) * b])
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x), y).backward()
            self.optimizer.step()
        sync(self.device)
        return steps


class OpacusStepRecipe:
    """Opacus 1.6's per-step work (``make_private``, hooks or ghost clipping) on device-resident Poisson batches.

    ``make_private`` gets a stand-in DataLoader of the right length and batch size (so that its
    sample rate and expected batch size are the real ones); the batches themselves are drawn on
    the device at that rate, so no DataLoader time is in the step.
    """

    def __init__(self, model, data: ImageTensors, batch_size: int, device: torch.device, mode: str) -> None:
        from opacus import PrivacyEngine

        self.device = device
        self.batches = DeviceBatches(data, device)
        stand_in = DataLoader(TensorDataset(torch.zeros(len(data), 1)), batch_size=batch_size)
        out = PrivacyEngine().make_private(
            module=model.to(device), optimizer=torch.optim.SGD(model.parameters(), lr=LR), data_loader=stand_in,
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, poisson_sampling=True,
            grad_sample_mode=mode, criterion=nn.CrossEntropyLoss())
        if mode == "ghost":
            self.model, self.optimizer, self.criterion, loader = out
        else:
            (self.model, self.optimizer, loader), self.criterion = out, nn.CrossEntropyLoss()
        self.sample_rate = poisson_sample_rate(len(data), batch_size)
        self.steps_per_epoch = len(loader)

    def run(self, max_steps: int | None) -> int:
        self.model.train()
        steps = self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch)
        n = len(self.batches)
        for _ in range(steps):
            mask = torch.rand(n, device=self.device, generator=self.batches.generator) < self.sample_rate
            x, y = self.batches.get(mask.nonzero()[:, 0])
            self.optimizer.zero_grad(set_to_none=True)
            self.criterion(self.model(x), y).backward()
            self.optimizer.step()
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
def decompress_for_torchvision(raw: str) -> None:
    """torchvision's ``datasets.MNIST`` reads the plain IDX files: write them beside the .gz ones (temp + rename)."""
    import gzip
    import shutil

    for name in os.listdir(raw):
        plain = os.path.join(raw, name[:-3])
        if name.endswith(".gz") and not os.path.exists(plain):
            with gzip.open(os.path.join(raw, name)) as src, open(plain + ".tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(plain + ".tmp", plain)


def mnist_workload(args):
    data = load_mnist(args.data_root, train=True)
    decompress_for_torchvision(os.path.join(args.data_root, "MNIST", "raw"))
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


def wrn_workload(args):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.wrn_size, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.wrn_size,), generator=g)
    data = ImageTensors(images, labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return data, NormalizedTensorDataset(data), lambda: build_model("wrn16_4", in_channels=3, num_classes=10,
                                                                    image_size=32)


WORKLOADS = {"mnist": mnist_workload, "celeba64": celeba_workload, "wrn16_4": wrn_workload}


def step_flops(model_cls, data: ImageTensors, batch: int) -> float:
    """FLOPs of one non-private forward + backward at ``batch`` (counted on the meta device: nothing runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model_cls().to("meta")
    x = torch.empty(batch, *data.images.shape[1:], device="meta")
    y = torch.zeros(batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


def matmul_ceilings(device: torch.device) -> dict:
    """Measured TFLOP/s of an 8192^3 matrix product in bf16 and in fp32 with TF32 (median of 10, after 3)."""
    if device.type != "cuda":
        return {}
    out, n = {}, 8192
    saved = torch.backends.cuda.matmul.allow_tf32
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        torch.backends.cuda.matmul.allow_tf32 = True
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        times = []
        for i in range(13):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            if i >= 3:
                times.append(start.elapsed_time(end) / 1e3)
        out[name] = 2 * n**3 / statistics.median(times) / 1e12
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = saved
    return out


def refuse(message: str):
    """Bad input: one line on stderr, exit status 2."""
    print(f"bench_dpsgd.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_engine(engine: str, args) -> tuple[str, dict]:
    """("opacus" | "opacus-hooks" | "opacus-ghost" | "plain" | "fast", fast engine options) from a name."""
    if engine in ("opacus", "opacus-hooks", "opacus-ghost", "plain"):
        return engine, {}
    if engine == "fast-fp32":  # the engine before run 9's speed options (fp32 matmuls, NCHW, 3-sd padding)
        return "fast", dict(BASELINE_OPTIONS)
    options = {k: v for k, v in (("precision", args.precision), ("channels_last", args.channels_last),
                                 ("pad_sigmas", args.pad_sigmas), ("grad_sample_mode", args.grad_sample_mode),
                                 ("cuda_graphs", False if args.no_cuda_graphs else None)) if v is not None}
    name, _, rest = engine.partition(":")
    if name != "fast":
        refuse(f"unknown engine {engine!r}")
    for item in filter(None, rest.split("+")):  # "," separates the engines
        key, _, value = item.partition("=")
        if key not in FAST_KEYS:
            refuse(f"{engine!r}: option must be one of {tuple(FAST_KEYS)}")
        try:
            options[key] = parse_option(key, value)
        except ValueError:
            refuse(f"{engine!r}: {key} takes a {FAST_KEYS[key].__name__}, not {value!r}")
    return "fast", options


def parse_option(key: str, value: str):
    """A fast-engine option's value from text, typed by ``FAST_KEYS`` (unknown keys: booleans)."""
    kind = FAST_KEYS.get(key, bool)
    return value.lower() in ("1", "true", "yes") if kind is bool else kind(value)


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
    p.add_argument("--workloads", default="mnist,celeba64,wrn16_4")
    p.add_argument("--engines", default="opacus,fast",
                   help="for MNIST and CelebA-64: opacus,opacus-hooks,opacus-ghost,plain,fast,fast-fp32,"
                        "fast:key=value+key=value (module docstring)")
    p.add_argument("--wrn-engines", default="plain,opacus-hooks,opacus-ghost,fast",
                   help="as --engines, for the WRN-16-4 workload")
    p.add_argument("--wrn-size", type=int, default=50000)
    p.add_argument("--wrn-large-batch", type=int, default=0, help="as --large-batch, for WRN-16-4 (0 skips)")
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

    ceilings = matmul_ceilings(device)
    if ceilings:
        print("matmul ceilings (TFLOP/s, 8192^3): " + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()))
    from bench_models import WORKLOADS as MODEL_WORKLOADS  # noqa: PLC0415 (bench_models imports this module)

    WORKLOADS.update(MODEL_WORKLOADS)  # resnet18_gn, vit_b_16 (issue 22)
    results = []
    for workload in args.workloads.split(","):
        if workload not in WORKLOADS:
            refuse(f"--workloads: unknown {workload!r}, valid: {tuple(WORKLOADS)}")
        data, stock_dataset, model_cls = WORKLOADS[workload](args)
        engines = (args.wrn_engines if workload == "wrn16_4" else args.engines).split(",")
        makers = []
        for engine in engines:
            kind, options = parse_engine(engine, args)
            large = args.wrn_large_batch if workload == "wrn16_4" else args.large_batch
            batches = [args.batch_size] + ([large] if engine == "fast" and large else [])
            for batch in batches:
                for dp in (True, False):
                    if (kind == "plain" and dp) or (kind.startswith("opacus-") and not dp):
                        continue
                    makers.append((engine, batch, dp, *make_recipe(kind, options, model_cls, data, stock_dataset,
                                                                   batch, dp, device, workers, args)))
        timed = time_interleaved(makers, args, device) if interleave else [
            time_recipe(make, run_args, device) for *_, make, run_args in makers]
        flops = {b: step_flops(model_cls, data, b) for b in {m[1] for m in makers}}
        for (engine, batch, dp, _, _), timing in zip(makers, timed):
            row = {"workload": workload, "engine": engine, "dp": dp, "batch_size": batch, **timing}
            row["steps_per_epoch"] = make_plan(DPSettings(enabled=dp), num_train=len(data), batch_size=batch,
                                                epochs=1).steps_per_epoch
            row["ms_per_step"] = 1e3 * row["seconds_per_epoch"] / row["steps_per_epoch"]
            row["model_gflop_per_step"] = flops[batch] / 1e9
            row["tflops"] = flops[batch] / row["ms_per_step"] / 1e9
            results.append(row)
            print(f"  {workload:8s} {engine:12s} dp={dp!s:5s} B={batch:5d}: {row['seconds_per_epoch']:.4f} s/epoch"
                  f"{' (extrapolated)' if row['extrapolated'] else ''}, {row['ms_per_step']:.2f} ms/step, "
                  f"peak {row['peak_memory_mb']:.0f} MB", flush=True)

    print_table(results, device, "seconds_per_epoch", "median")
    if args.epochs > 1:
        print_table(results, device, "min_seconds_per_epoch", "fastest run")
    print_step_table(results, device, ceilings)
    if args.json:
        out = {"device": args.device, "date": datetime.date.today().isoformat(), "versions": versions(device),
               "matmul_ceilings_tflops": ceilings,
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": results}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def make_recipe(kind: str, options: dict, model_cls, data, stock_dataset, batch: int, dp: bool,
                device: torch.device, workers: int, args):
    """(make, run_args): a recipe factory for one configuration, and the arguments its timed runs use."""
    if kind == "opacus":
        run_args = argparse.Namespace(**{**vars(args), "max_steps": args.stock_max_steps or args.max_steps})
        return (lambda: StockRecipe(model_cls(), stock_dataset, batch, dp, device, workers)), run_args
    if kind == "plain":
        return (lambda: PlainRecipe(model_cls(), data, batch, device)), args
    if kind.startswith("opacus-"):
        run_args = argparse.Namespace(**{**vars(args), "max_steps": args.stock_max_steps or args.max_steps})
        return (lambda: OpacusStepRecipe(model_cls(), data, batch, device, kind.split("-")[1])), run_args
    return (lambda: FastRecipe(model_cls(), data, batch, dp, device, None, None, options)), args


def print_step_table(results: list[dict], device: torch.device, ceilings: dict) -> None:
    """ms per step, peak memory and achieved useful TFLOP/s, against the plain PyTorch row of the workload."""
    ceiling = ceilings.get("tf32")
    print(f"\nPer step (median), useful TFLOP/s = FLOPs of one non-private forward+backward / step time"
          + (f"; measured matmul ceilings: TF32 {ceiling:.0f}, bf16 {ceilings['bf16']:.0f} TFLOP/s" if ceiling else ""))
    print(f"{'workload':9s} {'engine':28s} {'DP':>3s} {'B':>6s} {'ms/step':>9s} {'x plain':>8s} {'peak MB':>8s}"
          f" {'x plain':>8s} {'TFLOP/s':>8s} {'% TF32':>7s}")
    for r in results:
        plain = next((q for q in results if q["workload"] == r["workload"] and q["engine"] == "plain"
                      and q["batch_size"] == r["batch_size"]), None)
        t_ratio = f"{r['ms_per_step'] / plain['ms_per_step']:.2f}" if plain else "-"
        m_ratio = f"{r['peak_memory_mb'] / plain['peak_memory_mb']:.2f}" if plain else "-"
        share = f"{100 * r['tflops'] / ceiling:.1f}" if ceiling else "-"
        print(f"{r['workload']:9s} {r['engine'][:28]:28s} {'yes' if r['dp'] else 'no':>3s} {r['batch_size']:6d}"
              f" {r['ms_per_step']:9.2f} {t_ratio:>8s} {r['peak_memory_mb']:8.0f} {m_ratio:>8s}"
              f" {r['tflops']:8.1f} {share:>7s}")
    sys.stdout.flush()


def print_table(results: list[dict], device: torch.device, key: str, label: str) -> None:
    def find(w, e, dp, b):
        return next((r for r in results if (r["workload"], r["engine"], r["dp"], r["batch_size"]) == (w, e, dp, b)),
                    None)

    print(f"\nDP-SGD seconds per epoch ({label} of the timed runs) on {device.type}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()},"
          f" {torch.get_num_threads()} threads); * = extrapolated from partial epochs")
    print(f"{'workload':9s} {'engine':12s} {'B':>6s} {'DP s/ep':>10s} {'nonDP s/ep':>11s} {'DP/nonDP':>9s}"
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
        print(f"{w:9s} {e:12s} {b:6d} {fmt(r):>10s} {fmt(nd):>11s}"
              f" {(r[key] / nd[key]) if nd else float('nan'):8.2f}x"
              f" {r['peak_memory_mb']:8.0f} {nd['peak_memory_mb'] if nd else float('nan'):9.0f}"
              f" {ratio_dp:>14s} {ratio_nd:>17s}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())

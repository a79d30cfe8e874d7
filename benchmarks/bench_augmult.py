"""Augmentation multiplicity at the literature's scale: DP-SGD example-views per second against a tuned yardstick.

Workload (issue 23): WideResNet-16-4 (GroupNorm, ``build_model("wrn16_4")``) on random but fixed 32x32x3
uint8 images (``--size``, CIFAR-10's 50,000 by default), expected batch ``--batch`` (4096), each sampled
example seen as K random crops and flips (``--ks``, default 1,4,16), their gradients averaged before clipping.

Rows:

* ``dp``: the fast engine's DP step (``FastOptions(augmult=K, augment_flip=True)``, the engine's default
  per-sample backend, or ``--vmap-ks``: the torch.func vmap path for those K, for a side-by-side), after
  ``--warmup-steps`` untimed steps, ``--steps`` timed steps: example-views per second (sampled examples x K),
  ms per step, peak memory, and the useful TFLOP/s (the FLOPs of a non-private forward + backward of that
  many views, ``step_flops``) against the GPU's measured matmul ceiling (``matmul_ceilings``); ``--physical``
  (views a chunk, a list) adds a row per chunk size; ``--kept-precision fp32,reduced`` a row per way of forming
  the manual backend's kept per-example gradients: ``reduced`` from the bf16 operands under bf16 (tensor
  cores), ``fp32`` the previous rule (IEEE fp32 from the upcast operands), ``library`` as the library chooses
  (reduced from K = 16 on), patched in for that row only, so that they are timed side by side in one run;
  ``--fuse library,off`` a row with and one without the fused ReLU -> GroupNorm kernels of WRN's blocks
  (``FastOptions.fuse``; the library fuses on CUDA).
* ``yardstick``: plain PyTorch *non-private* training of the same model on the same kind of augmented
  images: each step a batch of uniformly drawn images, one random crop and flip each on the device
  (the engine's ``augment``), SGD with momentum 0.9, bf16 autocast (``--precision``), channels-last, and
  ``torch.compile`` (``c`` configurations) or eager (``e``), at every physical batch of ``--plain``
  (default ``e1024,e4096,c1024,c4096`` on CUDA). The best of them is the yardstick: ``x yard`` = the DP
  time for a number of views / the yardstick's time for as many images.

``--weight-standardization`` builds every row's model with weight-standardised convs (De et al.'s WRN, the
default CIFAR-10 recipe's). One command on an H100 (about 5 minutes, mostly the two compilations):

    python benchmarks/bench_augmult.py --device cuda --json augmult.json

Both kept precisions side by side at K = 1 and 16 (H100, about 2 minutes; eager yardstick only; the warm-up
steps cover cuDNN's searches for the bf16 grouped kernel's padded shapes):

    python benchmarks/bench_augmult.py --device cuda --ks 1,16 --batch 4096 --precision bf16 \
        --kept-precision fp32,reduced --vmap-ks '' --plain e4096 --steps 3 --warmup-steps 3 --json augmult_kept.json

Tiny CPU run (checks the script; numbers mean nothing):

    python benchmarks/bench_augmult.py --device cpu --size 64 --batch 16 --ks 1,2 --steps 1 --warmup-steps 1 \
        --plain e8 --precision fp32 --vmap-ks 2 --plain-images 16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from bench_dpsgd import PeakMemory, fast_engine, matmul_ceilings, step_flops, sync, versions
from dpvision.data.tensors import ImageTensors
from dpvision.engines.augmult import augment
from dpvision.engines.per_sample import ManualPerSample
from dpvision.models import build_model


def wrn(weight_standardization: bool, channels_last: bool = False):
    """The registry's WRN-16-4 for CIFAR-10's shapes (weight-standardised convs: De et al.'s choice)."""
    model = build_model("wrn16_4", in_channels=3, num_classes=10, image_size=32,
                        weight_standardization=weight_standardization)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def random_images(size: int) -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (size,), generator=g)
    return ImageTensors(images, labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@contextlib.contextmanager
def kept_precision(kept: str):
    """The manual backend's kept per-example gradients for the block only (a benchmark-only patch): ``fp32``
    from upcast operands (the rule before issue 23), ``reduced`` from the bf16 operands whatever the chunk (the
    library does so in chunks of at most ``KEPT_AMP_MAX_EXAMPLES`` examples), ``library``: the library as it is."""
    saved = ManualPerSample._kept_dtype
    if kept == "fp32":
        ManualPerSample._kept_dtype = lambda self, examples: torch.float32
    elif kept == "reduced":
        ManualPerSample._kept_dtype = lambda self, examples: self.amp_dtype or torch.float32
    try:
        yield
    finally:
        ManualPerSample._kept_dtype = saved


def time_dp(data: ImageTensors, k: int, mode: str | None, physical: int | None, kept: str, fuse: str, args,
            device: torch.device) -> dict:
    """The fast engine's DP step with K views of every sampled example: views/s, ms/step, peak MB."""
    options = {"augmult": k, "augment_flip": True, "grad_sample_mode": mode, "physical_batch_size": physical,
               "fuse": False if fuse == "off" else None}
    if device.type == "cuda":
        options.update(precision=args.precision, channels_last=args.channels_last)
    with PeakMemory(device) as mem, kept_precision(kept):
        engine = fast_engine(wrn(args.weight_standardization), data, args.batch, dp=True, device=device, options=options)
        engine.train_epoch(max_steps=args.warmup_steps)  # the per-layer autotune and cuDNN's searches
        sync(device)
        done, examples, start = 0, 0, time.perf_counter()
        while done < args.steps:  # epochs of the plan's steps_per_epoch, as many as needed
            result = engine.train_epoch(max_steps=args.steps - done)  # ends with a host sync (loss read)
            done, examples = done + result.steps, examples + sum(engine.last_batch_sizes)
        sync(device)
        elapsed = time.perf_counter() - start
    return {"row": "dp", "k": k, "backend": engine.grad_sample_mode, "kept": kept, "fused": engine.fused_blocks,
            "physical_examples": engine.settings.max_physical,
            "steps": done, "views": examples * k, "seconds": elapsed, "ms_per_step": 1e3 * elapsed / max(done, 1),
            "views_per_s": examples * k / elapsed, "peak_memory_mb": mem.mb}


class Yardstick:
    """Plain non-private training: augmented batches, SGD momentum, autocast, channels-last, compiled or not."""

    def __init__(self, data: ImageTensors, batch: int, compiled: bool, args, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.device, self.batch, self.bf16 = device, batch, args.precision == "bf16"
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.generator = torch.Generator(device).manual_seed(0)
        self.model = wrn(args.weight_standardization, channels_last=cuda).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.forward = torch.compile(self.model, dynamic=False) if compiled else self.model

    def step(self) -> None:
        idx = torch.randint(0, len(self.labels), (self.batch,), device=self.device, generator=self.generator)
        x = (self.images[idx].float().div_(255.0) - self.mean) / self.std  # [b, 3, 32, 32], as the engine's order
        x = augment(x, k=1, flip=True, generator=self.generator).squeeze(1).contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.forward(x).float(), self.labels[idx])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_yardstick(data: ImageTensors, config: str, args, device: torch.device) -> dict:
    """``config``: "c" (compiled) or "e" (eager), then the physical batch, e.g. ``c4096``."""
    if config[:1] not in ("c", "e") or not config[1:].isdigit() or int(config[1:]) < 1:
        raise SystemExit(f"bench_augmult.py: error: --plain: {config!r} is not c<batch> or e<batch>, e.g. c4096")
    batch, compiled = int(config[1:]), config[0] == "c"
    with PeakMemory(device) as mem:
        recipe = Yardstick(data, batch, compiled, args, device)
        for _ in range(args.plain_warmup_steps):  # compilation, cuDNN's algorithm choice
            recipe.step()
        sync(device)
        steps = max(3, -(-args.plain_images // batch))
        start = time.perf_counter()
        for _ in range(steps):
            recipe.step()
        sync(device)
        elapsed = time.perf_counter() - start
    return {"row": "yardstick", "config": config, "compiled": compiled, "batch": batch, "steps": steps,
            "views": steps * batch, "seconds": elapsed, "ms_per_step": 1e3 * elapsed / steps,
            "views_per_s": steps * batch / elapsed, "peak_memory_mb": mem.mb}


def print_rows(rows: list[dict], flops_per_view: float, ceiling: float | None) -> None:
    best = max((r for r in rows if r["row"] == "yardstick"), key=lambda r: r["views_per_s"], default=None)
    print(f"\n{'row':10s} {'K':>3s} {'backend/config':>22s} {'views/s':>10s} {'ms/step':>9s} {'peak MB':>9s}"
          f" {'TFLOP/s':>8s} {'% ceil':>7s} {'x yard':>7s}")
    for r in rows:
        r["tflops"] = flops_per_view * r["views_per_s"] / 1e12
        r["x_yardstick_time"] = best["views_per_s"] / r["views_per_s"] if best else None
        share = f"{100 * r['tflops'] / ceiling:.1f}" if ceiling else "-"
        label = f"{r['backend']}/{r['physical_examples'] * r['k']}" if r["row"] == "dp" else r["config"]
        if r["row"] == "dp" and r["backend"] == "manual":
            label += f"/{r['kept']}" + ("" if r["fused"] else "/unfused")
        ratio = f"{r['x_yardstick_time']:.2f}" if best else "-"
        print(f"{r['row']:10s} {r.get('k', 1):3d} {label:>22s} {r['views_per_s']:10.0f} {r['ms_per_step']:9.1f}"
              f" {r['peak_memory_mb']:9.0f} {r['tflops']:8.1f} {share:>7s} {ratio:>7s}")
    if best:
        print(f"yardstick: {best['config']} at {best['views_per_s']:.0f} images/s; x yard = DP time / yardstick time"
              " for the same number of views")
    sys.stdout.flush()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", type=int, default=50000, help="training images (random 32x32x3)")
    p.add_argument("--batch", type=int, default=4096, help="expected (logical) batch of the DP rows")
    p.add_argument("--ks", default="1,4,16", help="augmentation multiplicities of the DP rows")
    p.add_argument("--vmap-ks", default="4", help="K of extra DP rows on the torch.func vmap path ('' for none)")
    p.add_argument("--physical", default="", help="fast engine's physical_batch_size (views per chunk), a comma "
                                                  "list: one row each (default: the engine's)")
    p.add_argument("--kept-precision", default="library",
                   help="manual backend's kept per-example gradients, a comma list of fp32 (the rule before issue "
                        "23), reduced (from the bf16 operands at every K) and library (as the library chooses): "
                        "one row each")
    p.add_argument("--fuse", default="library", help="fused ReLU -> GroupNorm kernels, a comma list of library "
                                                    "(the engine's default: on CUDA) and off: one row each")
    p.add_argument("--steps", type=int, default=5, help="timed DP steps per row")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"], help="CUDA only (CPU: fp32)")
    p.add_argument("--channels-last", default=False, action=argparse.BooleanOptionalAction,
                   help="the fast engine's channels_last (CUDA; the yardstick is always channels-last on CUDA)")
    p.add_argument("--plain", default=None, help="yardstick configs, c<batch> compiled / e<batch> eager "
                                                 "(default e1024,e4096,c1024,c4096 on CUDA, e256 on CPU; none: no yardstick)")
    p.add_argument("--plain-images", type=int, default=131072, help="images per timed yardstick run")
    p.add_argument("--plain-warmup-steps", type=int, default=3)
    p.add_argument("--weight-standardization", action="store_true",
                   help="weight-standardised convs (model.weight_standardization), every row")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for flag in ("size", "batch", "steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    kept = args.kept_precision.split(",")
    if not kept or any(v not in ("fp32", "reduced", "library") for v in kept):
        p.error(f"--kept-precision: {args.kept_precision!r} is not a comma list of fp32, reduced and library")
    fuse = args.fuse.split(",")
    if not fuse or any(v not in ("library", "off") for v in fuse):
        p.error(f"--fuse: {args.fuse!r} is not a comma list of library and off")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type != "cuda":
        args.precision = "fp32"
    torch.manual_seed(0)
    ceilings = matmul_ceilings(device)
    ceiling = ceilings.get("bf16" if args.precision == "bf16" else "tf32")
    if ceilings:
        print("matmul ceilings (TFLOP/s, 8192^3): " + ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()))
    data = random_images(args.size)
    rows = []
    plain = args.plain or ("e1024,e4096,c1024,c4096" if device.type == "cuda" else "e256")
    for config in filter(None, [] if plain == "none" else plain.split(",")):
        rows.append(time_yardstick(data, config, args, device))
        print(f"  yardstick {config}: {rows[-1]['views_per_s']:.0f} images/s", flush=True)
    physicals = [int(v) for v in args.physical.split(",") if v] or [None]
    runs = [(int(k), None, v, kept, fuse) for k in args.ks.split(",") if k for v in physicals
            for kept in args.kept_precision.split(",") for fuse in args.fuse.split(",")]
    runs += [(int(k), "vmap", None, "reduced", "off") for k in args.vmap_ks.split(",") if k]
    for k, mode, physical, kept, fuse in runs:
        rows.append(time_dp(data, k, mode, physical, kept, fuse, args, device))
        print(f"  dp K={k} {rows[-1]['backend']} {rows[-1]['physical_examples']} examples a chunk, kept {kept}, "
              f"{rows[-1]['fused']} norms fused: {rows[-1]['views_per_s']:.0f} views/s", flush=True)
    flops_per_view = step_flops(functools.partial(wrn, args.weight_standardization), data, 64) / 64
    print_rows(rows, flops_per_view, ceiling)
    if args.json:
        out = {"date": datetime.date.today().isoformat(), "versions": versions(device), "matmul_ceilings": ceilings,
               "flops_per_view": flops_per_view, "settings": vars(args), "rows": rows}
        with open(args.json + ".tmp", "w") as f:
            json.dump(out, f, indent=2)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

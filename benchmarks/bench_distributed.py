"""Data-parallel throughput: examples per second and scaling efficiency for world sizes 1..N.

Workloads (the data are random but fixed uint8 images of the real shapes; throughput does not
depend on pixel values, and the Poisson batch sizes depend only on N and B):

==========  ===========================  ===================  ======
workload    model                        images               B
==========  ===========================  ===================  ======
mnist       SampleConvNet                60,000 x 1x28x28     256
celeba64    CelebaCNN (width 16)         20,000 x 3x64x64     256
wrn16_4     WideResNet-16-4              50,000 x 3x32x32     4096
==========  ===========================  ===================  ======

Strong scaling: the global batch B (what privacy and accuracy are tuned for) stays fixed and is
split over the ranks; each rank Poisson-samples its shard at q = 1 / ceil(N / B). For each world
size W the script starts W processes (``spawn``, rendezvous on a free local port; NCCL on CUDA,
gloo on the CPU), runs ``--warmup-steps`` steps, then ``--repeats`` timed runs of ``--max-steps``
steps each (every run ends with the epoch's all-reduce of the metrics, so rank 0's clock covers
every rank's work). Reported: global examples per second (median run), and scaling efficiency
= throughput(W) / (W x throughput(1)).

Under torchrun (RANK, WORLD_SIZE... set) the script measures that one world, e.g. across nodes:

    python benchmarks/bench_distributed.py --device cuda --world-sizes 1,2,4,8 --json dist.json
    torchrun --nproc-per-node 8 benchmarks/bench_distributed.py --device cuda --json dist8.json
    python benchmarks/bench_distributed.py --device cpu --tiny --world-sizes 1,2 --json smoke.json  # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dpvision.data.tensors import ImageTensors
from dpvision.engines import OptimizerSpec, build_engine
from dpvision.engines.distributed import DistContext, free_port
from dpvision.privacy.plan import DPSettings, make_plan

LR = 0.1
# name: (model name, model options, examples, image shape, classes, batch size); --tiny: (examples, batch size)
WORKLOADS = {
    "mnist": ("sample_convnet", {}, 60_000, (1, 28, 28), 10, 256),
    "celeba64": ("celeba_cnn", {"width": 16}, 20_000, (3, 64, 64), 2, 256),
    "wrn16_4": ("wrn16_4", {}, 50_000, (3, 32, 32), 10, 4096),
}
TINY = {"mnist": (4096, 256), "celeba64": (1024, 64), "wrn16_4": (256, 16)}


def workload_data(name: str, tiny: bool) -> tuple[ImageTensors, int]:
    _, _, n, shape, classes, batch = WORKLOADS[name]
    if tiny:
        n, batch = TINY[name]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return ImageTensors(images, labels, (0.5,) * shape[0], (0.25,) * shape[0]), batch


def measure(dist: DistContext, args) -> list[dict]:
    """Every (workload, engine, DP) row for this world; every rank runs it, rank 0's rows count."""
    from dpvision.models import build_model  # lazily: the model registry is the heaviest import

    rows = []
    for workload in args.workloads.split(","):
        model_name, options, _, shape, classes, _ = WORKLOADS[workload]
        data, batch = workload_data(workload, args.tiny)
        for engine_name in args.engines.split(","):
            for dp in ([True, False] if args.non_private else [True]):
                torch.manual_seed(0)
                model = build_model(model_name, in_channels=shape[0], num_classes=classes, image_size=shape[1],
                                    **options)
                settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
                plan = make_plan(settings if dp else settings.deactivated(), num_train=len(data), batch_size=batch,
                                 epochs=1)
                engine = build_engine(engine_name, model=model, train_data=data, plan=plan,
                                      optimizer=OptimizerSpec(lr=LR), seed=0, device=dist)
                steps = min(args.max_steps, engine.steps_per_epoch)
                engine.train_epoch(max_steps=min(args.warmup_steps, engine.steps_per_epoch))
                times, examples = [], []
                for _ in range(args.repeats):
                    dist.barrier()
                    start = time.perf_counter()
                    result = engine.train_epoch(max_steps=steps)  # ends with the all-reduce of its metrics
                    times.append(time.perf_counter() - start)
                    examples.append(result.examples)
                rate = [e / t for e, t in zip(examples, times)]
                rows.append({"workload": workload, "engine": engine.name, "dp": dp, "world_size": dist.world_size,
                             "batch_size": batch, "num_examples": len(data), "steps": steps,
                             "examples_per_s": statistics.median(rate), "all_examples_per_s": rate,
                             "seconds_per_step": statistics.median(times) / max(steps, 1)})
                if dist.is_main:
                    r = rows[-1]
                    print(f"  W={dist.world_size} {workload:8s} {engine.name:6s} dp={dp!s:5s} B={batch:5d}: "
                          f"{r['examples_per_s']:10.1f} examples/s, {1e3 * r['seconds_per_step']:.2f} ms/step",
                          flush=True)
                del engine, model
    return rows


def rank_main(rank: int, world: int, port: int, out: str, args) -> None:
    """One spawned rank: the environment torchrun would set, then :func:`measure`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    setup(args)
    with DistContext.from_env(device=args.device) as dist:
        rows = measure(dist, args)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def setup(args) -> None:
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)


def spawn_world(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        mp.start_processes(rank_main, args=(world, free_port(), str(out), args), nprocs=world, join=True,
                           start_method="spawn")
        return json.loads(out.read_text())


def add_efficiency(rows: list[dict]) -> None:
    """efficiency = throughput(W) / (W x throughput(1)) for rows that have a world-1 twin."""
    for r in rows:
        base = next((b for b in rows if b["world_size"] == 1 and all(b[k] == r[k] for k in
                                                                  ("workload", "engine", "dp", "batch_size"))), None)
        r["scaling_efficiency"] = r["examples_per_s"] / (r["world_size"] * base["examples_per_s"]) if base else None


def print_table(rows: list[dict]) -> None:
    print(f"\n{'workload':9s} {'engine':7s} {'DP':>3s} {'B':>5s} {'W':>3s} {'examples/s':>12s} {'ms/step':>9s}"
          f" {'efficiency':>10s}")
    for r in rows:
        eff = f"{r['scaling_efficiency']:.2f}" if r["scaling_efficiency"] is not None else "-"
        print(f"{r['workload']:9s} {r['engine']:7s} {'yes' if r['dp'] else 'no':>3s} {r['batch_size']:5d}"
              f" {r['world_size']:3d} {r['examples_per_s']:12.1f} {1e3 * r['seconds_per_step']:9.2f} {eff:>10s}")
    sys.stdout.flush()


def versions(device: str) -> dict:
    import opacus

    out = {"python": platform.python_version(), "torch": torch.__version__, "opacus": opacus.__version__,
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        out.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    default_worlds = torch.cuda.device_count() if torch.cuda.is_available() else min(2, os.cpu_count() or 1)
    p.add_argument("--world-sizes", default=",".join(str(w) for w in range(1, max(default_worlds, 1) + 1)),
                   help="comma-separated world sizes to spawn (default 1..GPUs, or 1..2 on the CPU)")
    p.add_argument("--workloads", default="mnist,celeba64,wrn16_4")
    p.add_argument("--engines", default="fast", help="fast, opacus or both (comma-separated)")
    p.add_argument("--non-private", action="store_true", help="also time each workload without DP")
    p.add_argument("--max-steps", type=int, default=50, help="steps per timed run (at most an epoch)")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--tiny", action="store_true", help="small data and batches (a CPU smoke test)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every rank")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            p.error(f"--workloads: unknown {name!r}, valid: {', '.join(WORKLOADS)}")
    try:
        worlds = [int(w) for w in args.world_sizes.split(",")]
    except ValueError:
        p.error(f"--world-sizes must be comma-separated integers, got {args.world_sizes!r}")
    if any(w < 1 for w in worlds) or (args.device == "cuda" and max(worlds) > torch.cuda.device_count()):
        p.error(f"--world-sizes must be between 1 and {torch.cuda.device_count() if args.device == 'cuda' else 'N'}")
    if min(args.max_steps, args.warmup_steps, args.repeats) < 1:
        p.error("--max-steps, --warmup-steps and --repeats must be >= 1")
    args.worlds = worlds
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ:  # under torchrun: this one world
        setup(args)
        with DistContext.from_env(device=args.device) as dist:
            rows = measure(dist, args)
        if not dist.is_main:
            return 0
    else:
        rows = []
        for world in args.worlds:
            print(f"world size {world}:", flush=True)
            rows += spawn_world(world, args)
    add_efficiency(rows)
    print_table(rows)
    if args.json:
        out = {"device": args.device, "date": datetime.date.today().isoformat(), "versions": versions(args.device),
               "settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

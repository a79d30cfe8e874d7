"""Large logical batches: one DP epoch of SampleConvNet and the CelebA CNN at a big expected batch size.

Checks that the fast engine's accumulation over physical chunks runs at logical batches up to
16,384 on a GPU (4,096 on a CPU) without running out of memory, and prints seconds per epoch and
peak memory for each.

    python benchmarks/large_batch.py --device cuda --data-root data
    python benchmarks/large_batch.py --device cpu --data-root data --batch-sizes 4096 --max-steps 3
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from dpvision.data.mnist import load_mnist
from dpvision.data.tensors import ImageTensors
from dpvision.models import CelebaCNN, SampleConvNet
from dpvision.engines import OptimizerSpec, build_engine
from dpvision.privacy.plan import DPSettings, make_plan


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="expected batch sizes (default: 4096 16384 on cuda, 4096 on cpu)")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per epoch to time (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = args.batch_sizes or ([4096, 16384] if device.type == "cuda" else [4096])
    mnist = load_mnist(args.data_root, train=True)
    gen = torch.Generator().manual_seed(0)
    faces = ImageTensors(torch.randint(0, 256, (20_000, 3, 64, 64), dtype=torch.uint8, generator=gen),
                         torch.randint(0, 2, (20_000,), generator=gen), (0.5,) * 3, (0.25,) * 3)
    print(f"{'workload':10} {'batch':>6} {'steps':>6} {'s/epoch':>9} {'peak MB':>9}  device {device}")
    for name, data, model_fn in (("mnist", mnist, SampleConvNet), ("celeba64", faces, CelebaCNN)):
        for batch in sizes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            plan = make_plan(DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), num_train=len(data),
                             batch_size=batch, epochs=1)
            engine = build_engine("fast", model=model_fn(), train_data=data, plan=plan,
                                  optimizer=OptimizerSpec(lr=1.0), seed=0, device=device)
            engine.train_epoch(max_steps=1)  # warm-up: graph capture, allocator
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            result = engine.train_epoch(max_steps=args.max_steps)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.perf_counter() - start) * engine.steps_per_epoch / result.steps
            print(f"{name:10} {batch:6d} {result.steps:6d} {seconds:9.3f} {peak_memory_mb(device):9.0f}", flush=True)


if __name__ == "__main__":
    main()

"""Where a fast-engine DP step spends its time: per-layer norm methods, engine variants, kernel profile.

Sections (``--sections``, comma-separated, run in this order):

* ``layers``: every Conv2d of WRN-16-4 at the chunk size, with its real input and output
  gradient: ms for the squared per-example norms by ghost Gram matrices, by materialised
  per-example gradients (unfolded patches + one batched product), by cuDNN's grouped
  weight-gradient kernel (the batch as groups), and for the book-keeping clipped sum (one
  weight-gradient call), in TF32 and bf16; and which method ``choose_method`` picks.
* ``variants``: ms per step and peak memory of FastEngine configurations (``--variants``),
  next to the plain PyTorch eager step of the same model and batch.
* ``numerics``: relative L2 distance of the update after 3 noise-free steps, each precision
  against the fp32 engine.
* ``profile``: torch.profiler tables (top CUDA kernels) of eager steps, padded as under graphs.
* ``flops``: FLOPs of one DP chunk (FlopCounterMode) against one non-private forward + backward.

    python benchmarks/profile_dp_step.py --out prof --sections layers,variants,numerics,profile,flops
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dpsgd import (  # noqa: E402
    MAX_GRAD_NORM, NOISE_MULTIPLIER, PlainRecipe, celeba_workload, fast_engine, parse_option, wrn_workload,
)

from dpvision.engines import ghost  # noqa: E402
from dpvision.engines.per_sample import ManualPerSample  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # --device


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def cuda_ms(fn, repeats: int = 10, warmup: int = 3) -> float:
    """Median ms of ``fn()`` (host clock around a device synchronisation)."""
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


_BASE = [0]


def reset_memory() -> None:
    """Free what earlier configurations left (graphs, hook cycles), then count from what is still allocated."""
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _BASE[0] = torch.cuda.memory_allocated()


def peak_mb() -> float:
    """Peak allocated since ``reset_memory``, less what was allocated then (the data of other workloads)."""
    return (torch.cuda.max_memory_allocated() - _BASE[0]) / 2**20 if DEV.type == "cuda" else float("nan")


def layer_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, nn.Conv2d, torch.Tensor,
                                                                                     torch.Tensor]]:
    """(name, conv, input a, output gradient dz) of every Conv2d for one batch."""
    store, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: store.__setitem__(name, (mod, inp[0].detach(), out))))
    loss = F.cross_entropy(model(x), y, reduction="sum")
    dzs = torch.autograd.grad(loss, [out for _, _, out in store.values()])
    for h in handles:
        h.remove()
    return [(name, m, a, dz) for (name, (m, a, _)), dz in zip(store.items(), dzs)]


def section_layers(args, out: dict) -> None:
    data, _, model_cls = wrn_workload(argparse.Namespace(wrn_size=args.chunk))
    model = model_cls().to(DEV)
    x = ((data.images.to(DEV).float() / 255) - 0.5) / 0.25
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = True
    methods = (ghost.GHOST, ghost.MATERIALISE, ghost.GROUPED)
    for name, conv, a, dz in layer_inputs(model, x, data.labels.to(DEV)):
        t, d, p = ghost.layer_shape(conv, a, dz)
        row = {"layer": name, "T": t, "d": d, "p": p, "rule": ghost.choose_method(conv, a, dz)}
        ref = ghost.weight_norm_sq(conv, a.double(), dz.double(), ghost.MATERIALISE, torch.float64)
        for dtype_name, dtype in (("tf32", torch.float32), ("bf16", torch.bfloat16)):
            ad, dzd = a.to(dtype), dz.to(dtype)
            for method in methods:
                got = ghost.weight_norm_sq(conv, ad, dzd, method, dtype)
                row[f"{method}_{dtype_name}_err"] = float(((got - ref).abs() / ref).max())
                row[f"{method}_{dtype_name}"] = cuda_ms(lambda: ghost.weight_norm_sq(conv, ad, dzd, method, dtype))
            row[f"tuned_{dtype_name}"] = ghost.fastest_method(conv, ad, dzd, dtype)
            f = torch.rand(len(a), device=DEV)
            views = {"weight": torch.zeros(conv.weight.numel(), device=DEV)}
            row[f"clipped_{dtype_name}"] = cuda_ms(
                lambda: ghost.add_clipped_sum(conv, ad, dzd, f, (None, None), dtype, views))
        rows.append(row)
    out["layers"] = rows
    cols = [*methods, "clipped"]
    print(f"\nper-layer ms, WRN-16-4, B={args.chunk}: squared norms by ghost / materialise / grouped, clipped sum")
    print(f"{'layer':20s} {'T':>5s} {'d':>5s} {'p':>4s} {'rule':>6s} {'tf32':>6s} {'bf16':>6s} " +
          " ".join(f"{c[:6] + '_' + k:>12s}" for k in ("tf32", "bf16") for c in cols))
    for r in rows:
        print(f"{r['layer']:20s} {r['T']:5d} {r['d']:5d} {r['p']:4d} {r['rule'][:6]:>6s} {r['tuned_tf32'][:6]:>6s}"
              f" {r['tuned_bf16'][:6]:>6s} "
              + " ".join(f"{r[f'{c}_{k}']:12.3f}" for k in ("tf32", "bf16") for c in cols))
    for k in ("tf32", "bf16"):
        rule = sum(r[f"{r['rule']}_{k}"] for r in rows)
        tuned = sum(r[f"{r[f'tuned_{k}']}_{k}"] for r in rows)
        best = sum(min(r[f"{m}_{k}"] for m in methods) for r in rows)
        clipped = sum(r[f"clipped_{k}"] for r in rows)
        err = max(r[f"{m}_{k}_err"] for m in methods for r in rows)
        print(f"  {k}: sum over layers: rule {rule:.2f} ms, tuned {tuned:.2f} ms, best {best:.2f} ms, "
              f"clipped sums {clipped:.2f} ms; max rel. norm error {err:.1e}")


WORK = {"wrn16_4": wrn_workload, "celeba64": celeba_workload}


def parse_options(text: str) -> dict:
    """"precision=bf16,cuda_graphs=0" -> {"precision": "bf16", "cuda_graphs": False}."""
    options = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        options[key] = parse_option(key, value)  # the keys FAST_KEYS does not know are booleans: plain, autotune
    return options


def parse_variant(text: str) -> tuple[str, bool, dict]:
    """"wrn16_4:dp:precision=bf16,cuda_graphs=0" -> (workload, dp, options)."""
    workload, dp, *rest = text.split(":")
    return workload, dp == "dp", parse_options(rest[0] if rest else "")


_DATA: dict = {}


def make_data(workload: str, args):
    """(data, stock dataset, model factory) of a workload, made once per size."""
    key = (workload, args.wrn_size, args.celeba_size)
    if key not in _DATA:
        _DATA[key] = WORK[workload](argparse.Namespace(wrn_size=args.wrn_size, celeba_size=args.celeba_size))
    return _DATA[key]


def variant_runner(model_cls, data, dp: bool, options: dict, args, **engine_options):
    """``(run(steps) -> steps taken, engine or None)`` for one variant: plain PyTorch or the fast engine."""
    torch.manual_seed(0)
    if options.pop("plain", False):
        return PlainRecipe(model_cls(), data, args.batch_size, DEV).run, None
    engine = fast_engine(model_cls(), data, args.batch_size, dp=dp, device=DEV, options={**engine_options, **options})
    return (lambda steps: engine.train_epoch(max_steps=steps).steps), engine


def time_variant(workload: str, dp: bool, options: dict, args) -> dict:
    data, _, model_cls = make_data(workload, args)
    reset_memory()
    options = dict(options)
    method = options.pop("method", None)
    autotune = options.pop("autotune", True)
    run, engine = variant_runner(model_cls, data, dp, options, args)
    if engine is not None and isinstance(engine.backend, ManualPerSample):
        engine.backend.method = method or engine.backend.method
        engine.backend.autotune = autotune
    run(3)
    times = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        steps = run(args.steps)
        sync()
        times.append((time.perf_counter() - start) / steps * 1e3)
    engine = locals().get("engine")
    graphs = engine.use_graphs if engine is not None else False  # False also when a capture failed
    chosen = dict(engine.backend.chosen) if engine is not None and engine.backend is not None else {}
    return {"ms_per_step": statistics.median(times), "all_ms": times, "peak_mb": peak_mb(), "graphs": graphs,
            "methods": chosen}


def section_variants(args, out: dict) -> None:
    rows = []
    for text in args.variants.split(";"):
        workload, dp, options = parse_variant(text)
        try:
            row = {"variant": text, **time_variant(workload, dp, options, args)}
        except Exception as err:  # noqa: BLE001 (report and go on: one broken variant must not end the run)
            row = {"variant": text, "error": repr(err)[:300]}
        rows.append(row)
        print(f"  {text:60s} " + (f"{row['ms_per_step']:8.2f} ms/step  peak {row['peak_mb']:7.0f} MB"
                                  f"  graphs {row['graphs']}"
                                  if "error" not in row else row["error"]), flush=True)
        if row.get("methods"):
            print("      methods: " + " ".join(f"{k}={(v or '-')[:5]}" for k, v in row["methods"].items()))
    out["variants"] = rows


def section_numerics(args, out: dict) -> None:
    """One noise-free step (lr 1, so the update is the clipped sum / E[B]) per precision against fp32 (unfused),
    relative to the fp32 update and to the norm of the noise that step would add (sigma C sqrt(P) / E[B]).
    ``--numerics-options`` (e.g. ``augmult=16,augment_flip=1``) go to every engine; on CUDA each precision runs
    fused and unfused (``fuse``), so a fused kernel's error is read next to the rounding of the same precision."""
    rows = []
    extra = parse_options(args.numerics_options)
    fuses = (False, True) if DEV.type == "cuda" else (False,)
    for workload in ("wrn16_4", "celeba64"):
        data, _, model_cls = make_data(workload, argparse.Namespace(wrn_size=2048, celeba_size=2048))
        torch.manual_seed(0)
        model = model_cls()
        start = torch.cat([p.detach().flatten() for p in model.parameters()]).double().cpu()
        updates = {}
        for precision, fuse in [(p, f) for p in ("fp32", "tf32", "bf16") for f in fuses]:  # fp32 unfused first
            torch.backends.cudnn.allow_tf32 = precision != "fp32"
            engine = fast_engine(copy.deepcopy(model), data, args.batch_size, dp=True, device=DEV,
                                 options={**extra, "precision": precision, "fuse": fuse}, noise_multiplier=0.0, lr=1.0)
            engine.train_epoch(max_steps=1)
            updates[precision, fuse] = torch.cat([p.detach().flatten() for p in engine.model.parameters()]).double() \
                .cpu() - start
        torch.backends.cudnn.allow_tf32 = True
        noise = NOISE_MULTIPLIER * MAX_GRAD_NORM * len(start) ** 0.5 / engine.plan.expected_batch_size
        reference = updates["fp32", False]
        for (precision, fuse), update in updates.items():
            if (precision, fuse) == ("fp32", False):
                continue
            diff = float((update - reference).norm())
            row = {"workload": workload, "precision": precision, "fuse": fuse, "options": args.numerics_options,
                   "rel_update_error": diff / float(reference.norm()), "error_vs_noise": diff / noise}
            rows.append(row)
            print(f"  numerics {workload:9s} {precision} fuse={int(fuse)}: one step vs fp32 unfused: rel. L2 "
                  f"{row['rel_update_error']:.2e}, {row['error_vs_noise']:.2e} of the noise norm (sigma=1)", flush=True)
    out["numerics"] = rows


def section_profile(args, out: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    for text in args.profile.split(";"):
        workload, dp, options = parse_variant(text)
        data, _, model_cls = make_data(workload, args)
        run, _ = variant_runner(model_cls, data, dp, options, args, cuda_graphs=False, static_shapes=True)
        run(min(3, args.profile_steps))  # warm-up: kernels compiled and tuned, caches filled
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(args.profile_steps)
            sync()
        table = prof.key_averages().table(sort_by=args.sort, row_limit=args.rows, max_name_column_width=70)
        events = prof.key_averages()
        total = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) \
            / 1e3 / args.profile_steps
        print(f"\nprofile {text}: {total:.2f} ms of kernel time a step ({args.profile_steps} steps)\n{table}")
        safe = text.replace(":", "_").replace(",", "_").replace("=", "-")
        with open(os.path.join(args.out, f"profile_{safe}.txt"), "w") as f:
            f.write(table)
        out.setdefault("profile", {})[text] = total


def section_flops(args, out: dict) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from bench_dpsgd import step_flops

    data, _, model_cls = make_data("wrn16_4", argparse.Namespace(wrn_size=args.batch_size, celeba_size=0))
    engine = fast_engine(model_cls(), data, args.batch_size, dp=True, device=DEV, options={"cuda_graphs": False})
    idx = torch.arange(args.batch_size, device=DEV)
    engine.backend.autotune = False  # the shape rule: ghost and materialise (bmm), whose FLOPs are counted right
    engine.step.chunk(idx)  # FlopCounterMode miscounts cuDNN's grouped weight gradient (as one full conv)
    with FlopCounterMode(display=False) as counter:
        engine.step.chunk(idx)
    dp_flops = counter.get_total_flops()
    plain = step_flops(model_cls, data, args.batch_size)
    by_op = {str(k): v / 1e9 for k, v in counter.get_flop_counts()["Global"].items()}
    print(f"\nWRN-16-4, B={args.batch_size}: DP chunk {dp_flops / 1e9:.0f} GFLOP vs non-private fwd+bwd "
          f"{plain / 1e9:.0f} GFLOP ({dp_flops / plain:.2f}x); by op: {by_op}")
    out["flops"] = {"dp_gflop": dp_flops / 1e9, "plain_gflop": plain / 1e9, "by_op_gflop": by_op}


def main() -> int:
    global DEV
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="prof")
    p.add_argument("--device", default=DEV.type, choices=["cpu", "cuda"])
    p.add_argument("--sections", default="layers,variants,numerics,profile,flops")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--chunk", type=int, default=288, help="examples in the per-layer section (a padded chunk)")
    p.add_argument("--wrn-size", type=int, default=50000)
    p.add_argument("--celeba-size", type=int, default=20000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="wrn16_4:nodp:plain=1;wrn16_4:dp;wrn16_4:dp:precision=bf16")
    p.add_argument("--profile", default="wrn16_4:dp;wrn16_4:nodp:plain=1")
    p.add_argument("--rows", type=int, default=25, help="rows of each profile table")
    p.add_argument("--numerics-options", default="",
                   help="engine options of the numerics section, e.g. augmult=16,augment_flip=1")
    p.add_argument("--profile-steps", type=int, default=10,
                   help="steps profiled (after up to 3 warm-up steps); 2 for the large augmult steps")
    p.add_argument("--sort", default="cuda_time_total",
                   help="profile table order (self_cuda_time_total: kernels by their own time)")
    args = p.parse_args()
    if args.profile_steps < 1:
        p.error(f"--profile-steps must be at least 1, not {args.profile_steps}")
    DEV = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    out = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "torch": torch.__version__}
    sections = {"layers": section_layers, "variants": section_variants, "numerics": section_numerics,
                "profile": section_profile, "flops": section_flops}
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            sections[name](args, out)
        except Exception as err:  # noqa: BLE001 (keep what the other sections found)
            print(f"section {name} failed: {err!r}")
            out[f"{name}_error"] = repr(err)
        print(f"[section {name}: {time.perf_counter() - start:.0f} s]", flush=True)
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Session 13 diagnostic (issue 22): where a fast DP step of ResNet-18 (GroupNorm, 32x32, B 256) spends its time.
GPU busy time (sum of kernel times) against wall time says whether the step is GPU-bound or host-bound."""
import sys, time, torch
sys.path.insert(0, "benchmarks")
import bench_models as bm, bench_dpsgd as bench
from torch.profiler import profile, ProfilerActivity

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
size = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
for engine in ("fast:precision=tf32", "fast:precision=bf16", "plain"):
    args = type("A", (), {"resnet_image_size": 32, "resnet_size": size})()
    data, _, model_fn = bm.resnet_workload(args)
    kind, options = bm.parse_engine(engine)
    recipe = bm.make_recipe(kind, dict(options), model_fn, data, 256, dev)()
    recipe.run(5)
    t = time.perf_counter(); n = recipe.run(10); wall = (time.perf_counter() - t) / n
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        n = recipe.run(10)
    ev = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ev) / 1e3 / n
    print(f"== {engine}: wall {1e3 * wall:.2f} ms/step (unprofiled), kernel time {gpu:.2f} ms/step, "
          f"GPU busy {gpu / (1e3 * wall):.0%}")
    print(ev.table(sort_by="self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total", row_limit=22,
                   max_name_column_width=60))
    del recipe; torch.cuda.empty_cache() if dev.type == "cuda" else None

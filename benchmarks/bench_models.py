"""Users' own models on the GPU: torchvision ResNet-18 (GroupNorm) and ViT-B/16, DP-SGD against Opacus and plain.

Issue 22's step-time targets, one command (random but fixed uint8 images: step times do not depend on
the pixels):

* ``resnet18_gn``: ``torchvision:resnet18`` made DP-compatible by dpvision's own
  :func:`~dpvision.models.external.resolve_model` (BatchNorm -> GroupNorm(32), in-place activations
  off) at 32x32, 10 classes, B = 256. Target: fast DP >= 3x faster than Opacus hooks, and at most
  1.3x the step time of plain non-private PyTorch.
* ``vit_b_16``: ``torchvision:vit_b_16`` (attention as Opacus's ``DPMultiheadAttention``) at 224x224,
  10 classes, B = 32. Target: fast DP >= 2x faster than Opacus's best mode (hooks or ghost).

torchvision's residual blocks add in place (``out += identity``) on the output of a GroupNorm, which
Opacus's full backward hooks (hooks and ghost modes) refuse ("Output 0 of BackwardHookFunction is a view
and is being modified inplace"). Every row of ``resnet18_gn`` therefore runs the same network with
that one addition written out of place (:class:`OutOfPlaceBasicBlock`: same parameters, same
arithmetic); the row ``opacus-hooks:inplace_residual=1`` runs torchvision's own block and records the
refusal (rows that fail say why in ``error`` instead of being dropped).

Engines (``--resnet-engines``, ``--vit-engines``; ``name:key=value+key=value``):

* ``plain`` (non-private yardstick, :class:`PlainVariant`): eager PyTorch, data on the device, mean
  cross-entropy, SGD. Keys: ``precision`` (``fp32``: torch's defaults, i.e. fp32 matmuls and TF32
  convolutions; ``tf32``: TF32 matmuls too; ``bf16``: autocast to bfloat16), ``channels_last``,
  ``compile`` (``1``: ``torch.compile`` of the model in its default mode, or a mode by name such as
  ``reduce-overhead``, CUDA graphs of forward and backward; compile time is in the warm-up).
* ``opacus-hooks``, ``opacus-ghost``: Opacus 1.6 ``make_private(grad_sample_mode=...)`` on
  device-resident Poisson batches (``bench_dpsgd.OpacusStepRecipe``). Keys: ``precision`` (``fp32``
  or ``tf32``), ``inplace_residual`` (ResNet: torchvision's own block).
* ``fast``: dpvision's ``FastEngine`` (``bench_dpsgd.FastRecipe``); keys as in ``bench_dpsgd.py``
  (``precision``, ``channels_last``, ``grad_sample_mode``, ``method``, ...) and ``keep_gb`` (the manual
  backend's budget for per-example gradients kept from pass 1 for pass 2, ``FAST_KEYS``). ``bf16`` applies to the manual backend
  only; under the vmap backend it runs as ``tf32``. Both workloads get the manual backend by default (ViT-B/16:
  its LayerNorm rule, attention's Linears on the tokens [B, T, d], and the class token and position embedding
  from the gradient at the encoder's summed tokens, :mod:`dpvision.engines.tokens`); the ViT rows name
  ``grad_sample_mode`` (``vmap`` or ``manual``) to compare the two. Each fast row records the backend it ran on
  and, for the manual one, how many layers took each norm method (``norm_methods``: ghost, materialise,
  grouped; ``None``: a 2-D Linear, nothing to choose; on CUDA the autotuned choice).

Each configuration runs alone (built, ``--warmup-steps`` untimed steps, which include graph capture,
cuDNN tuning and compilation, then ``--rounds`` timed runs of ``--steps`` steps; median reported),
then is freed before the next (the ViT rows hold tens of GB each). Reported per row: ms/step,
images/s (the expected batch size under DP), peak memory (CUDA ``max_memory_allocated``; peak RSS on the
CPU) and, per workload, the issue's ratios against the best row of each kind.

    python benchmarks/bench_models.py --json gpu_models.json                  # both workloads, all rows
    python benchmarks/bench_models.py --workloads vit_b_16 --steps 10 --json vit.json --vit-engines \
        plain:precision=tf32,opacus-hooks:precision=tf32,opacus-ghost:precision=tf32,\
fast:precision=tf32+grad_sample_mode=vmap,fast:precision=tf32+grad_sample_mode=manual,\
fast:precision=bf16+grad_sample_mode=manual                               # ViT: the manual backend vs the rest
    python benchmarks/bench_models.py --device cpu --steps 2 --rounds 1 --warmup-steps 1 \\
        --resnet-batch 8 --vit-image-size 32 --vit-batch 4 --size 64      # every row, tiny (CPU check)

Registered in ``bench_dpsgd.py``'s ``WORKLOADS`` too (there with its flags: ``--batch-size`` for both).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

import bench_dpsgd as bench
from dpvision.data.tensors import ImageTensors
from dpvision.engines.graphs import Numerics
from dpvision.models.external import resolve_model
from dpvision.privacy.plan import DPSettings, make_plan

NUM_CLASSES = 10
PLAIN_KEYS = {"precision": str, "channels_last": bool, "compile": str}
OPACUS_KEYS = {"precision": str, "inplace_residual": bool}
# The fast rows' keys: bench_dpsgd's (``keep_gb`` among them: the manual backend's keep budget, GiB of float32).
FAST_KEYS = bench.FAST_KEYS
RESNET_ENGINES = ("plain,plain:precision=bf16+channels_last=1,plain:compile=1+precision=bf16+channels_last=1,"
                  "plain:compile=reduce-overhead+precision=bf16+channels_last=1,opacus-hooks:inplace_residual=1,"
                  "opacus-hooks,opacus-hooks:precision=tf32,opacus-ghost:precision=tf32,fast:precision=tf32,"
                  "fast:precision=bf16+channels_last=1")
VIT_ENGINES = ("plain,plain:precision=tf32,plain:precision=bf16,plain:compile=1+precision=bf16,opacus-hooks,"
               "opacus-hooks:precision=tf32,opacus-ghost:precision=tf32,fast:precision=tf32+grad_sample_mode=vmap,"
               "fast:precision=fp32+grad_sample_mode=manual,fast:precision=tf32+grad_sample_mode=manual,"
               "fast:precision=bf16+grad_sample_mode=manual")


class OutOfPlaceBasicBlock(BasicBlock):
    """torchvision's ResNet basic block with ``out = out + identity`` instead of ``out += identity``.

    Same parameters and arithmetic; the in-place addition modifies a GroupNorm output that Opacus's
    full backward hooks wrap in a view, which autograd refuses.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def random_images(n: int, size: int, seed: int = 0) -> ImageTensors:
    """n random but fixed uint8 RGB images [n, 3, size, size], 10 classes, CIFAR-like normalisation."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return ImageTensors(images, labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def resnet18_gn(image_size: int, *, inplace_residual: bool = False) -> nn.Module:
    """torchvision ResNet-18 through dpvision's resolve_model (GroupNorm), residuals out of place unless asked."""
    model = resolve_model("torchvision:resnet18", in_channels=3, num_classes=NUM_CLASSES, image_size=image_size)
    if not inplace_residual:
        for module in model.modules():
            if type(module) is BasicBlock:
                module.__class__ = OutOfPlaceBasicBlock
    return model


def vit_b_16(image_size: int) -> nn.Module:
    return resolve_model("torchvision:vit_b_16", in_channels=3, num_classes=NUM_CLASSES, image_size=image_size)


def resnet_workload(args):
    """bench_dpsgd's workload contract: (data, a map-style dataset for the stock recipe, a model factory)."""
    size = getattr(args, "resnet_image_size", 32)
    data = random_images(getattr(args, "resnet_size", 50_000), size)
    return data, bench.NormalizedTensorDataset(data), lambda **kw: resnet18_gn(size, **kw)


def vit_workload(args):
    size = getattr(args, "vit_image_size", 224)
    data = random_images(getattr(args, "vit_size", 1024), size)
    return data, bench.NormalizedTensorDataset(data), lambda: vit_b_16(size)


WORKLOADS = {"resnet18_gn": resnet_workload, "vit_b_16": vit_workload}


class PlainVariant(bench.PlainRecipe):
    """bench_dpsgd's plain PyTorch step, with its numerics, memory format and compilation chosen."""

    def __init__(self, model, data, batch_size: int, device: torch.device, *, precision: str = "fp32",
                 channels_last: bool = False, compile: str = "0") -> None:
        if precision not in ("fp32", "tf32", "bf16"):
            raise ValueError(f"plain precision must be fp32, tf32 or bf16, got {precision!r}")
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        super().__init__(model.to(memory_format=self.memory_format), data, batch_size, device)
        mode = {"0": None, "1": "default"}.get(compile, compile)  # or a torch.compile mode by name
        self.forward = torch.compile(self.model, mode=mode) if mode else self.model
        self.numerics, self.bf16 = Numerics(precision != "fp32", False), precision == "bf16"

    def run(self, max_steps: int | None) -> int:
        self.model.train()
        n, b = len(self.batches), self.batch_size
        order = torch.randperm(n, device=self.device, generator=self.batches.generator)
        steps = self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch)
        with self.numerics:
            for s in range(steps):
                x, y = self.batches.get(order[s * b:(s + 1) * b])
                x = x.contiguous(memory_format=self.memory_format)
                self.optimizer.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss = F.cross_entropy(self.forward(x).float(), y)
                loss.backward()
                self.optimizer.step()
        bench.sync(self.device)
        return steps


class OpacusVariant(bench.OpacusStepRecipe):
    """bench_dpsgd's Opacus 1.6 step (hooks or ghost), its matmuls in fp32 or TF32."""

    def __init__(self, model, data, batch_size: int, device: torch.device, mode: str, *,
                 precision: str = "fp32") -> None:
        if precision not in ("fp32", "tf32"):
            raise ValueError(f"opacus precision must be fp32 or tf32, got {precision!r}")
        super().__init__(model, data, batch_size, device, mode)
        self.numerics = Numerics(precision == "tf32", False)

    def run(self, max_steps: int | None) -> int:
        with self.numerics:
            return super().run(max_steps)


def parse_engine(engine: str) -> tuple[str, dict]:
    """(kind, options) from ``kind:key=value+key=value``; kinds plain, opacus-hooks, opacus-ghost, fast."""
    kind, _, rest = engine.partition(":")
    keys = {"plain": PLAIN_KEYS, "opacus-hooks": OPACUS_KEYS, "opacus-ghost": OPACUS_KEYS,
            "fast": FAST_KEYS}.get(kind)
    if keys is None:
        raise SystemExit(f"bench_models.py: error: unknown engine {engine!r} (plain, opacus-hooks, opacus-ghost, "
                         "fast)")
    options = {}
    for item in filter(None, rest.split("+")):
        key, _, value = item.partition("=")
        if key not in keys:
            raise SystemExit(f"bench_models.py: error: {engine!r}: option must be one of {tuple(keys)}")
        kind_of = keys[key]
        try:
            options[key] = value.lower() in ("1", "true", "yes") if kind_of is bool else kind_of(value)
        except ValueError:
            raise SystemExit(f"bench_models.py: error: {engine!r}: {key} must be a {kind_of.__name__}, got "
                             f"{value!r}") from None
    return kind, options


def make_recipe(kind: str, options: dict, model_fn, data: ImageTensors, batch: int, device: torch.device):
    """A zero-argument factory of the recipe of one row (built inside the timing, so its memory counts)."""
    if kind == "plain":
        return lambda: PlainVariant(model_fn(), data, batch, device, **options)
    if kind.startswith("opacus-"):
        model_kw = {"inplace_residual": True} if options.pop("inplace_residual", False) else {}
        return lambda: OpacusVariant(model_fn(**model_kw), data, batch, device, kind.split("-")[1], **options)
    return lambda: bench.FastRecipe(model_fn(), data, batch, True, device, None, None, options)  # DP; keep_gb too


def time_row(make, args, device: torch.device) -> dict:
    """Build, warm up (untimed: capture, tuning, compilation), then ``--rounds`` timed runs of ``--steps`` steps;
    or ``{"error": ...}`` when the configuration cannot run (the reason in one line)."""
    try:
        with bench.PeakMemory(device) as mem:
            torch.manual_seed(0)
            start = time.perf_counter()
            recipe = make()
            recipe.run(args.warmup_steps)
            setup = time.perf_counter() - start
            per_step = []
            for _ in range(args.rounds):
                start = time.perf_counter()
                steps = recipe.run(args.steps)
                per_step.append((time.perf_counter() - start) / max(steps, 1))
            backend = backend_info(recipe)
        del recipe
    except Exception as err:  # noqa: BLE001 (a row that cannot run is reported, not dropped)
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return {"error": f"{type(err).__name__}: {text[:300]}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"ms_per_step": 1e3 * statistics.median(per_step), "min_ms_per_step": 1e3 * min(per_step),
            "all_ms_per_step": [1e3 * t for t in per_step], "steps_timed": steps, "setup_seconds": setup,
            "peak_memory_mb": mem.mb, **backend}


def backend_info(recipe) -> dict:
    """A fast row's per-sample backend and, for the manual one, how many layers took each norm method."""
    engine = getattr(recipe, "engine", None)
    if engine is None or getattr(engine, "backend", None) is None:
        return {}
    chosen = getattr(engine.backend, "chosen", {})
    return {"backend": engine.grad_sample_mode, "norm_methods": dict(Counter(str(m) for m in chosen.values()))}


def model_flops(model_fn, data: ImageTensors, batch: int) -> float | None:
    """FLOPs of one non-private forward + backward (bench_dpsgd.step_flops), or None where meta tensors fail."""
    try:
        return bench.step_flops(model_fn, data, batch)
    except Exception:  # noqa: BLE001 (an optional column)
        return None


def run_workload(name: str, engines: list[str], batch: int, args, device: torch.device, rows: list[dict],
                 on_row) -> None:
    """Time every engine of workload ``name``, appending a row to ``rows`` and calling ``on_row()`` after each."""
    data, _, model_fn = WORKLOADS[name](args)
    flops = model_flops(model_fn, data, batch)
    for engine in engines:
        kind, options = parse_engine(engine)
        dp = kind != "plain"
        settings = DPSettings(noise_multiplier=bench.NOISE_MULTIPLIER, max_grad_norm=bench.MAX_GRAD_NORM)
        plan = make_plan(settings if dp else settings.deactivated(), num_train=len(data), batch_size=batch, epochs=1)
        row = {"workload": name, "engine": engine, "dp": dp, "batch_size": batch,
               "image_size": int(data.images.shape[-1]), "expected_batch_size": plan.expected_batch_size,
               **time_row(make_recipe(kind, dict(options), model_fn, data, batch, device), args, device)}
        if "ms_per_step" in row:
            row["images_per_second"] = plan.expected_batch_size / row["ms_per_step"] * 1e3
            row["tflops"] = flops / row["ms_per_step"] / 1e9 if flops else None
        rows.append(row)
        print_row(row)
        on_row()


def best(rows: list[dict], workload: str, *kinds: str) -> dict | None:
    """The fastest row of ``workload`` whose engine kind is one of ``kinds``, among those that ran."""
    ran = [r for r in rows if r["workload"] == workload and "ms_per_step" in r
           and r["engine"].partition(":")[0] in kinds]
    return min(ran, key=lambda r: r["ms_per_step"], default=None)


# The non-private yardstick is the best-tuned plain step (compiled with CUDA graphs: 2.58 ms against 7.10 eager for
# ResNet-18 on an H100, docs/performance.md): without that row a run judges against a straw man, so it says so.
TUNED_PLAIN = "compile=reduce-overhead"


def checks(rows: list[dict]) -> list[dict]:
    """Issue 22's targets, each between the best rows of two kinds (None where a side did not run, or where the plain
    side lacks its tuned row: ``missing`` says which)."""
    out = []
    for workload, other, kinds, target, better, needs in (
            ("resnet18_gn", "opacus hooks", ("opacus-hooks",), 3.0, "speedup", None),
            ("resnet18_gn", "plain", ("plain",), 1.3, "slowdown", TUNED_PLAIN),
            ("vit_b_16", "opacus best (hooks or ghost)", ("opacus-hooks", "opacus-ghost"), 2.0, "speedup", None)):
        fast, ref = best(rows, workload, "fast"), best(rows, workload, *kinds)
        if not any(r["workload"] == workload for r in rows):
            continue
        tuned = needs is None or any(needs in r["engine"] and r["workload"] == workload and "ms_per_step" in r
                                     for r in rows)
        if fast is None or ref is None or not tuned:
            missing = "a side did not run" if tuned else f"no plain row with {needs} (the tuned yardstick) ran"
            out.append({"workload": workload, "versus": other, "target": target, "ratio": None, "met": None,
                        "missing": missing})
            continue
        ratio = ref["ms_per_step"] / fast["ms_per_step"] if better == "speedup" else \
            fast["ms_per_step"] / ref["ms_per_step"]
        met = ratio >= target if better == "speedup" else ratio <= target
        out.append({"workload": workload, "versus": other, "fast": fast["engine"], "reference": ref["engine"],
                    "kind": better, "ratio": ratio, "target": target, "met": met})
    return out


def print_row(r: dict) -> None:
    where = f"  {r['workload']:11s} {r['engine']:46s} B={r['batch_size']:4d}"
    if "error" in r:
        print(f"{where}  could not run: {r['error']}", flush=True)
        return
    backend = f" [{r['backend']}: {r['norm_methods']}]" if r.get("norm_methods") else \
        f" [{r['backend']}]" if "backend" in r else ""
    print(f"{where} {r['ms_per_step']:9.2f} ms/step {r['images_per_second']:9.0f} img/s "
          f"peak {r['peak_memory_mb']:8.0f} MB (set-up {r['setup_seconds']:.1f} s){backend}", flush=True)


def print_checks(found: list[dict]) -> None:
    print("\nIssue 22 targets (best fast DP row against the best row of the other kind):")
    for c in found:
        if c["ratio"] is None:
            print(f"  {c['workload']:11s} vs {c['versus']}: not judged ({c['missing']})")
            continue
        sign = ">=" if c["kind"] == "speedup" else "<="
        print(f"  {c['workload']:11s} {c['fast']} vs {c['reference']}: {c['kind']} {c['ratio']:.2f}x "
              f"(target {sign} {c['target']}x): {'met' if c['met'] else 'NOT met'}")
    sys.stdout.flush()


def write_json(args, device: torch.device, rows: list[dict]) -> None:
    """The results so far (rewritten after every row, temp file then rename: a cut run keeps what it measured)."""
    out = {"device": args.device, "date": datetime.date.today().isoformat(), "versions": bench.versions(device),
           "settings": {k: v for k, v in vars(args).items() if k != "json"}, "results": rows, "checks": checks(rows)}
    with open(args.json + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(args.json + ".tmp", args.json)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--workloads", default="resnet18_gn,vit_b_16")
    p.add_argument("--steps", type=int, default=15, help="steps per timed run")
    p.add_argument("--rounds", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--resnet-engines", default=RESNET_ENGINES)
    p.add_argument("--vit-engines", default=VIT_ENGINES)
    p.add_argument("--resnet-batch", type=int, default=256)
    p.add_argument("--resnet-image-size", type=int, default=32)
    p.add_argument("--resnet-size", type=int, default=50_000, help="training examples (random, fixed)")
    p.add_argument("--vit-batch", type=int, default=32)
    p.add_argument("--vit-image-size", type=int, default=224, help="a multiple of 16")
    p.add_argument("--vit-size", type=int, default=1024, help="training examples (random, fixed)")
    p.add_argument("--size", type=int, default=None, help="both --resnet-size and --vit-size")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.size:
        args.resnet_size = args.vit_size = args.size
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    save = (lambda: write_json(args, device, rows)) if args.json else (lambda: None)
    for workload in args.workloads.split(","):
        if workload not in WORKLOADS:
            raise SystemExit(f"bench_models.py: error: --workloads: unknown {workload!r}, valid: {tuple(WORKLOADS)}")
        resnet = workload == "resnet18_gn"
        batch = args.resnet_batch if resnet else args.vit_batch
        size = args.resnet_size if resnet else args.vit_size
        if size < batch * max(args.steps, args.warmup_steps):  # every timed run fits in one epoch
            raise SystemExit(f"bench_models.py: error: {workload}: --size {size} is under batch x steps "
                             f"({batch} x {max(args.steps, args.warmup_steps)})")
        engines = (args.resnet_engines if resnet else args.vit_engines).split(",")
        for engine in engines:  # every row's options checked before the first one runs
            parse_engine(engine)
        run_workload(workload, engines, batch, args, device, rows, save)
    print_checks(checks(rows))
    if args.json:
        write_json(args, device, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

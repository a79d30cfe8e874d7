"""benchmarks/bench_dpsgd.py's fast-engine recipe: the row options reach the engine they name."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

from dpvision.data.tensors import ImageTensors
from dpvision.models import SampleConvNet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_dpsgd  # noqa: E402


def tiny_mnist(n: int = 64) -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    return ImageTensors(images, torch.randint(0, 10, (n,), generator=g), (0.1307,), (0.3081,))


def test_keep_gb_sets_the_manual_backends_keep_budget_and_is_refused_elsewhere():
    cpu = torch.device("cpu")
    recipe = bench_dpsgd.FastRecipe(SampleConvNet(), tiny_mnist(), 16, True, cpu, "manual", False, {"keep_gb": 0.5})
    assert recipe.engine.backend.keep_budget == 2 ** 27  # 0.5 GiB of float32
    assert recipe.run(max_steps=1) == 1
    default = bench_dpsgd.FastRecipe(SampleConvNet(), tiny_mnist(), 16, True, cpu, "manual", False)
    assert default.engine.backend.keep_budget != 2 ** 27
    with pytest.raises(ValueError, match="keep_gb needs the manual backend, not vmap"):
        bench_dpsgd.FastRecipe(SampleConvNet(), tiny_mnist(), 16, True, cpu, "vmap", False, {"keep_gb": 0.5})


def test_gn_short_rows_sets_the_group_norm_kernel_choice_for_its_row_only():
    """fast:gn_short_rows=0 runs the one-row GroupNorm sums kernel (the side-by-side row of session 13's change);
    the next row without the option is back on the library's value."""
    from dpvision.engines import group_norm

    library, cpu = group_norm.SHORT_ROW_MAX, torch.device("cpu")
    assert bench_dpsgd.parse_option("gn_short_rows", "0") == 0
    bench_dpsgd.FastRecipe(SampleConvNet(), tiny_mnist(), 16, True, cpu, "manual", False, {"gn_short_rows": 0})
    assert group_norm.SHORT_ROW_MAX == 0
    bench_dpsgd.FastRecipe(SampleConvNet(), tiny_mnist(), 16, True, cpu, "manual", False)
    assert group_norm.SHORT_ROW_MAX == library > 0


@pytest.mark.parametrize("engine, message", [("fast:keep_gb=x", "keep_gb takes a float, not 'x'"),
                                             ("fast:nope=1", "option must be one of"), ("turbo", "unknown engine")])
def test_bad_engine_options_are_one_line_and_exit_status_2(engine, message, capsys):
    with pytest.raises(SystemExit) as stop:
        flags = argparse.Namespace(precision=None, channels_last=None, pad_sigmas=None, grad_sample_mode=None,
                                   no_cuda_graphs=False)  # the command line's speed flags, none given
        bench_dpsgd.parse_engine(engine, flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1


def test_bench_models_judges_the_plain_target_only_against_the_tuned_yardstick(capsys):
    """ResNet-18's <= 1.3x-plain target is judged only when the compiled reduce-overhead plain row ran: against eager
    rows alone (session 12's call) the script used to print "met" for a step 3x the tuned one."""
    import bench_models

    def row(engine, ms):
        return {"workload": "resnet18_gn", "engine": engine, "ms_per_step": ms}

    eager = [row("plain:precision=tf32", 8.03), row("fast:precision=tf32", 7.77),
             row("plain:precision=bf16+channels_last=1+compile=1", 10.96)]
    plain = {c["versus"]: c for c in bench_models.checks(eager)}["plain"]
    assert plain["met"] is None and plain["ratio"] is None and "compile=reduce-overhead" in plain["missing"]
    bench_models.print_checks([plain])
    assert "not judged (no plain row with compile=reduce-overhead" in capsys.readouterr().out
    tuned = eager + [row("plain:compile=reduce-overhead+precision=bf16+channels_last=1", 2.58)]
    plain = {c["versus"]: c for c in bench_models.checks(tuned)}["plain"]
    assert plain["met"] is False and abs(plain["ratio"] - 7.77 / 2.58) < 1e-9
    hooks = {c["versus"]: c for c in bench_models.checks(tuned)}["opacus hooks"]
    assert hooks["ratio"] is None and hooks["missing"] == "a side did not run"

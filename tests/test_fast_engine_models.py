"""The fast engine on fine-tuning models (issue 22): frozen parameters, and dropout under vmap.

Frozen parameters get no per-example gradient, no clipping, no noise and no optimizer step (P counts
only the trainable ones), as in Opacus. Dropout under ``torch.func.vmap`` draws each example's own mask
(``randomness="different"``) instead of failing and falling back to the stock engine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dpvision.engines import FastOptions, OptimizerSpec, build_engine
from dpvision.engines.fast import FastEngine
from dpvision.engines.per_sample import VmapPerSample
from dpvision.seeding import make_generator
from tests.engine_helpers import DP, fast_engine, plan_for
from tests.test_fast_engine import flat, make_data, opacus_reference, rel


def body_and_head(dropout: float | None = None) -> nn.Module:
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
              nn.ReLU()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(8, 3))


def run_both(model: nn.Module, mode: str | None, *, steps: int = 3, noise: float = 0.0):
    """(fast engine after ``steps`` DP steps, Opacus's model after the same batches, the start [P_all])."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    data = make_data(48, (1, 6, 6), 3)
    spec, dp, seed = OptimizerSpec(lr=0.5, momentum=0.9), DP(noise_multiplier=noise, max_grad_norm=0.05), 5
    fast = fast_engine(model=copy.deepcopy(model), train_data=data, batch_size=12, optimizer=spec, dp=dp,
                       seed=seed, grad_sample_mode=mode, precision="fp32")
    fast.train_epoch(max_steps=steps)
    masks = torch.rand(steps, len(data), generator=make_generator(seed, "sampling")) < fast.sample_rate
    ref = opacus_reference(copy.deepcopy(model), data, masks, spec=spec, dp=dp, sample_rate=fast.sample_rate,
                           device="cpu")
    return fast, ref, flat(model.parameters())


def frozen_body() -> nn.Module:
    torch.manual_seed(4)
    model = body_and_head()
    for p in model[:-1].parameters():  # linear probe: only the last layer trains
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("mode", ["manual", "vmap", "hooks"])
def test_frozen_body_equals_opacus_and_never_changes(mode):
    model = frozen_body()
    fast, ref, start = run_both(model, mode)
    assert fast.grad_sample_mode == mode
    assert fast.num_params == sum(p.numel() for p in model[-1].parameters())  # P: trainable only
    assert len(fast.optimizer.param_groups[0]["params"]) == 2
    update, ref_update = flat(fast.model.parameters()) - start, flat(ref.parameters()) - start
    assert ref_update.norm() > 0 and rel(update, ref_update) < 1e-5
    frozen = sum(p.numel() for p in model[:-1].parameters())
    assert torch.equal(update[:frozen], torch.zeros(frozen, dtype=update.dtype))


def test_frozen_parameters_get_no_noise():
    model = frozen_body()
    fast, _, start = run_both(model, "manual", noise=1.0)
    update = flat(fast.model.parameters()) - start
    frozen = sum(p.numel() for p in model[:-1].parameters())
    assert torch.equal(update[:frozen], torch.zeros(frozen, dtype=update.dtype)) and update[frozen:].norm() > 0


def test_partly_frozen_layer_runs_on_vmap_and_equals_opacus():
    """A layer with a frozen bias only: the manual layer formulas cover weight and bias together, so vmap."""
    torch.manual_seed(6)
    model = body_and_head()
    model[0].bias.requires_grad_(False)
    fast, ref, start = run_both(model, None)  # the default modes: manual, then vmap
    assert fast.grad_sample_mode == "vmap"
    assert rel(flat(fast.model.parameters()) - start, flat(ref.parameters()) - start) < 1e-5


def test_no_trainable_parameters_is_refused():
    model = body_and_head()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        fast_engine(model=model, train_data=make_data(8, (1, 6, 6), 3), batch_size=4,
                    optimizer=OptimizerSpec(lr=0.1), dp=DP(1.0, 1.0), seed=0)


def test_dropout_zero_on_vmap_equals_opacus():
    torch.manual_seed(2)
    fast, ref, start = run_both(body_and_head(dropout=0.0), "vmap")
    assert fast.grad_sample_mode == "vmap"
    assert rel(flat(fast.model.parameters()) - start, flat(ref.parameters()) - start) < 1e-5


@pytest.mark.parametrize("augmult", [0, 2])
def test_dropout_trains_on_the_fast_engine_with_a_mask_per_example(augmult):
    torch.manual_seed(2)
    data = make_data(40, (1, 6, 6), 3)
    options = FastOptions(grad_sample_mode="vmap", augmult=augmult)
    engine = build_engine("fast", model=body_and_head(dropout=0.5), train_data=data,
                          plan=plan_for(data, 10, DP(1.0, 1.0)), optimizer=OptimizerSpec(lr=0.1), seed=0,
                          options=options)
    assert isinstance(engine, FastEngine)  # no fallback to the stock engine
    start = flat(engine.model.parameters())
    result = engine.train_epoch(max_steps=2)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.loss))
    assert not torch.equal(flat(engine.model.parameters()), start)


def test_vmap_draws_a_different_dropout_mask_for_each_example():
    torch.manual_seed(0)
    model = body_and_head(dropout=0.5).train()
    backend = VmapPerSample(model)
    x = torch.randn(1, 1, 6, 6).expand(8, 1, 6, 6)  # eight copies of one example
    params = {n: p.detach() for n, p in zip(backend.names, backend.params)}
    grads, _ = backend._per_sample(params, x, torch.zeros(8, dtype=torch.long))
    head = grads[backend.names[-2]].flatten(1)  # [8, 3 * 8]: the last layer's per-example weight gradients
    assert len({tuple(row.tolist()) for row in head}) > 1

"""Data-parallel DP-SGD (both engines) on CPU with gloo: sampling, noise once, equivalence, resume, faults.

Ranks are fresh processes (``spawn``) that rendezvous on a free TCP port of 127.0.0.1 through
the same environment variables torchrun sets; a rank runs ``scenario_*`` functions of this module
and saves what they return for the tests to check. Starting processes is most of the cost, so one
launch per world size (2 and 3, a module fixture) serves the sampling, noise, equivalence and
resume tests, which run in CI; the fault tests (one launch each) are marked slow.

Statistical tolerances (the seeds are fixed, so each check is deterministic; the tolerances say
how far from the claim a result may be before it counts as wrong):

* global batch size ~ Binomial(N, q): over S steps, the sample mean within 4 standard errors
  (sqrt(Nq(1-q)/S)) of Nq and the sample variance within 4 standard errors (Var sqrt(2/(S-1)))
  of Nq(1-q) (S = 300 steps). Ranks sharing one stream would double (world 2) or triple (world 3)
  the variance, 12-24 standard errors away.
* noise once: std of the per-step update (lr = E, so the update is the noisy sum) within 8% of σC
  (~8 standard errors of a std estimated from 4,700 draws); noise added once per rank would be
  σC√2 (+41%) or σC√3 (+73%).
"""

from __future__ import annotations

import math
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dpvision.data.tensors import ImageTensors
from dpvision.engines import OpacusEngine, OptimizerSpec
from dpvision.engines.distributed import (
    DistContext, RankFailureError, ShardPoissonBatchSampler, free_port, shard_indices,
)  # fmt: skip
from dpvision.engines.fast import FastEngine
from dpvision.privacy.accounting import expected_batch_size, poisson_sample_rate
from dpvision.seeding import make_generator
from tests.engine_helpers import DP, plan_for

ENGINES = {"fast": FastEngine, "opacus": OpacusEngine}
JOIN_TIMEOUT_S = 240  # a multi-rank test that takes longer than this has hung


# --------------------------------------------------------------------- data, model, launching
def make_data(n: int, seed: int = 0) -> ImageTensors:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    return ImageTensors(images, torch.randint(0, 3, (n,), generator=g), (0.5,), (0.25,))


def tiny_model() -> nn.Module:
    """47 parameters; the same weights in every process."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))  # [B,1,4,4] -> [B,3]


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def build(engine: str, dist: DistContext | None, *, n: int, batch_size: int, dp: DP | None, lr: float = 1.0,
          seed: int = 0):
    return ENGINES[engine](model=tiny_model(), train_data=make_data(n), plan=plan_for(n, batch_size, dp),
                           optimizer=OptimizerSpec(lr=lr), seed=seed, device="cpu" if dist is None else dist)


def _rank_main(rank: int, world: int, port: int, out: str, scenario: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        with DistContext.from_env(device="cpu", timeout_s=kwargs.pop("timeout_s", 60)) as dist:
            result = globals()[f"scenario_{scenario}"](dist, Path(out), **kwargs)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException as err:
        (Path(out) / f"rank{rank}.err").write_text(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        raise SystemExit(1) from None


def launch(world: int, scenario: str, tmp_path: Path, *, wait_for: list[int] | None = None,
           **kwargs) -> tuple[list[int | None], list, list[str], float]:
    """Run ``scenario_<name>`` on ``world`` ranks: (exit codes, results, error texts, seconds).

    Waits (at most ``JOIN_TIMEOUT_S``) until the ranks ``wait_for`` (default: all) have ended, then
    kills any rank still running (its exit code is then ``None``).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, str(tmp_path), scenario, dict(kwargs)))
             for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    waited = [procs[r] for r in (range(world) if wait_for is None else wait_for)]
    while any(p.is_alive() for p in waited) and time.monotonic() - start < JOIN_TIMEOUT_S:
        time.sleep(0.1)
    seconds = time.monotonic() - start
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) if (tmp_path / f"rank{r}.pt").exists()
               else None for r in range(world)]
    errors = [(tmp_path / f"rank{r}.err").read_text() if (tmp_path / f"rank{r}.err").exists() else ""
              for r in range(world)]
    return codes, results, errors, seconds


def check_ok(codes, errors) -> None:
    assert codes == [0] * len(codes), "ranks failed:\n" + "\n".join(errors)


# --------------------------------------------------------------------- scenarios (run in each rank)
STATS_N, STATS_B, STATS_EPOCHS = 600, 30, 15  # q = 1/20: 300 steps, E[batch] = 30
NOISE_N, NOISE_B, NOISE_STEPS = 200, 10, 100  # E = 10; 100 steps x 47 parameters
NOISE_DP = DP(noise_multiplier=1e4, max_grad_norm=1e-4)  # σC = 1; clipped sums <= 1e-3, negligible


def scenario_statistics(dist: DistContext, out: Path) -> dict:
    """Global batch sizes (fast engine, and the Opacus engine's sampler) and per-step noisy updates."""
    engine = build("fast", dist, n=STATS_N, batch_size=STATS_B, dp=DP(noise_multiplier=1.0, max_grad_norm=1.0),
                   lr=0.01, seed=11)
    sizes, local = [], []
    for _ in range(STATS_EPOCHS):
        engine.train_epoch()
        sizes += engine.last_batch_sizes
        local += engine.last_local_batch_sizes or engine.last_batch_sizes
    q = poisson_sample_rate(STATS_N, STATS_B)
    sampler = ShardPoissonBatchSampler(num_examples=STATS_N, sample_rate=q, steps=len(sizes), dist=dist,
                                       generator=make_generator(12, dist.stream("sampling")))
    sampler_sizes = dist.all_reduce_sum_(torch.tensor([len(b) for b in sampler])).tolist()
    result = {"sizes": sizes, "local": local, "sampler_sizes": sampler_sizes}
    for name in ENGINES:
        e = expected_batch_size(NOISE_N, poisson_sample_rate(NOISE_N, NOISE_B))
        engine = build(name, dist, n=NOISE_N, batch_size=NOISE_B, dp=NOISE_DP, lr=float(e), seed=13)
        trail = [flat_params(engine.model)]
        while len(trail) <= NOISE_STEPS:
            engine.train_epoch(progress=lambda _k: trail.append(flat_params(engine.model)))
        steps = torch.stack(trail[:NOISE_STEPS + 1])  # [S + 1, 47]
        result[f"noise_{name}"] = (steps[1:] - steps[:-1]).double()  # update = -(clipped sum + noise)
        result[f"final_{name}"] = trail[-1]
    return result


EQ_N, EQ_B, EQ_STEPS, EQ_SEED, EQ_LR = 40, 8, 2, 5, 0.5
EQ_DP = DP(noise_multiplier=0.0, max_grad_norm=0.5)  # clips most examples, no noise


def scenario_equivalence(dist: DistContext, out: Path) -> dict:
    """Noise off: DP updates of two steps, and one epoch without DP, for both engines."""
    result = {}
    for name in ENGINES:
        engine = build(name, dist, n=EQ_N, batch_size=EQ_B, dp=EQ_DP, lr=EQ_LR, seed=EQ_SEED)
        before = flat_params(engine.model)
        engine.train_epoch(max_steps=EQ_STEPS)
        result[f"dp_{name}"] = (before, flat_params(engine.model))
        engine = build(name, dist, n=EQ_N, batch_size=EQ_B, dp=None, lr=EQ_LR, seed=EQ_SEED)
        epoch = engine.train_epoch()
        result[f"plain_{name}"] = (flat_params(engine.model), epoch)
    return result


def scenario_resume(dist: DistContext, out: Path) -> dict:
    """Epoch 2 of a run equals epoch 2 of a fresh engine loaded from the epoch-1 state (saved by rank 0)."""
    result = {}
    dp = DP(noise_multiplier=0.7, max_grad_norm=1.0)
    for name in ENGINES:
        first = build(name, dist, n=60, batch_size=10, dp=dp, lr=0.5, seed=7)
        first.train_epoch()
        state = first.state_dict()  # every rank calls it: it gathers the generators
        path = out / f"state_{name}.pt"
        if dist.is_main:
            torch.save(state, path)
        reference = first.train_epoch()
        again = build(name, dist, n=60, batch_size=10, dp=dp, lr=0.5, seed=7)
        dist.barrier()  # rank 0 has written the file
        again.load_state_dict(torch.load(path, weights_only=False) if dist.is_main else None)
        resumed = again.train_epoch()
        result[name] = (reference, flat_params(first.model), resumed, flat_params(again.model))
    return result


def scenario_all(dist: DistContext, out: Path) -> dict:
    """What the CI tests check, in one launch: statistics; with two ranks also equivalence and resume."""
    result = {"statistics": scenario_statistics(dist, out)}
    if dist.world_size == 2:
        result["equivalence"] = scenario_equivalence(dist, out)
        result["resume"] = scenario_resume(dist, out)
    return result


def scenario_failure(dist: DistContext, out: Path, *, how: str) -> dict:
    """Rank 1 fails at step 3 of DP training (``raise``, ``exit`` without a word, or ``hang``)."""
    engine = build("fast", dist, n=200, batch_size=10, dp=DP(noise_multiplier=1.0, max_grad_norm=1.0), seed=3)
    done = [0]

    def progress(k: int) -> None:
        done[0] += k
        if dist.rank == 1 and done[0] == 3:
            if how == "raise":
                raise ValueError("injected failure")
            if how == "exit":
                os._exit(3)
            time.sleep(3600)  # hang

    for _ in range(3):
        engine.train_epoch(progress=progress)
    return {}


# --------------------------------------------------------------------- tests
def in_process(scenario: str) -> dict:
    """World size 1: the scenario in this process, with a single-process context (one thread, as the ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend (30x slower on a busy 2-core box)
    try:
        return globals()[f"scenario_{scenario}"](DistContext(), Path("."))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``launched(world)``: every rank's ``scenario_all`` result and the launch folder (one launch per world)."""
    cache: dict[int, tuple[list, Path]] = {}

    def get(world: int) -> tuple[list, Path]:
        if world not in cache:
            out = tmp_path_factory.mktemp(f"world{world}")
            codes, results, errors, _ = launch(world, "all", out)
            check_ok(codes, errors)
            cache[world] = (results, out)
        return cache[world]

    return get


def check_binomial(sizes: list[int], n: int, q: float) -> None:
    s = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(float(s.mean()) - mean) < 4 * math.sqrt(var / len(s)), (float(s.mean()), mean)
    assert abs(float(s.var()) - var) < 4 * var * math.sqrt(2 / (len(s) - 1)), (float(s.var()), var)


def check_noise_once(updates: torch.Tensor, sigma_c: float) -> None:
    std = float(updates.std())
    assert abs(std / sigma_c - 1) < 0.08, f"update std {std:.4f}, expected σC = {sigma_c}"


@pytest.mark.slow  # in CI (the default run includes slow tests), not in the edit loop
@pytest.mark.parametrize("world", [1, 2, 3])
def test_global_batch_is_binomial_and_noise_is_added_once(world, launched):
    results = [in_process("statistics")] if world == 1 else [r["statistics"] for r in launched(world)[0]]
    q = poisson_sample_rate(STATS_N, STATS_B)
    sizes = results[0]["sizes"]
    assert len(sizes) == STATS_EPOCHS * int(1 / q)
    assert all(r["sizes"] == sizes for r in results)  # every rank reports the global sizes
    check_binomial(sizes, STATS_N, q)
    check_binomial(results[0]["sampler_sizes"], STATS_N, q)  # the Opacus engine's sampler
    if world > 1:  # ranks draw from their own streams, and the locals add up to the global sizes
        assert results[0]["local"] != results[1]["local"]
        assert [sum(t) for t in zip(*(r["local"] for r in results))] == sizes
    for name in ENGINES:
        check_noise_once(results[0][f"noise_{name}"], NOISE_DP.noise_multiplier * NOISE_DP.max_grad_norm)
        for r in results[1:]:  # the update is the same bytes on every rank
            assert torch.equal(r[f"final_{name}"], results[0][f"final_{name}"])


def reference_dp_params(before: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    """One process, float64: steps of mean clipped gradient (divisor int(N q)) over the given examples."""
    model = tiny_model().double()
    torch.nn.utils.vector_to_parameters(before.double(), model.parameters())
    data = make_data(EQ_N)
    divisor = expected_batch_size(EQ_N, poisson_sample_rate(EQ_N, EQ_B))
    for idx in indices:
        total = torch.zeros_like(before, dtype=torch.float64)
        for i in idx.tolist():
            x = data.normalize(data.images[i:i + 1]).double()
            loss = nn.functional.cross_entropy(model(x), data.labels[i:i + 1])
            g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
            total += min(1.0, EQ_DP.max_grad_norm / (float(g.norm()) + 1e-6)) * g
        with torch.no_grad():
            params = torch.nn.utils.parameters_to_vector(model.parameters()) - EQ_LR * total / divisor
            torch.nn.utils.vector_to_parameters(params, model.parameters())
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def sampled_indices(engine: str, world: int) -> list[torch.Tensor]:
    """The examples the ranks sampled in each step, redrawn from their generators ("sampling/rank{r}")."""
    q = poisson_sample_rate(EQ_N, EQ_B)
    steps: list[list[torch.Tensor]] = [[] for _ in range(EQ_STEPS)]
    for r in range(world):
        shard = shard_indices(EQ_N, rank=r, world_size=world)
        g = make_generator(EQ_SEED, f"sampling/rank{r}")
        if engine == "fast":  # one block of masks [steps, n_local]
            masks = torch.rand(EQ_STEPS, len(shard), generator=g) < q
        else:  # the DataLoader draws its base seed first, then the sampler draws each step's mask
            torch.empty((), dtype=torch.int64).random_(generator=g)
            masks = torch.stack([torch.rand(len(shard), generator=g) < q for _ in range(EQ_STEPS)])
        for s in range(EQ_STEPS):
            steps[s].append(shard[masks[s]])
    return [torch.cat(parts) for parts in steps]


def test_two_ranks_equal_one_process_without_noise(launched):
    results = [r["equivalence"] for r in launched(2)[0]]
    single = in_process("equivalence")
    for name in ENGINES:
        (before, after), (before1, after1) = results[0][f"dp_{name}"], results[1][f"dp_{name}"]
        assert torch.equal(after, after1) and torch.equal(before, before1)
        indices = sampled_indices(name, 2)
        assert all(len(i) for i in indices)
        expected = reference_dp_params(before, indices)
        assert float((after.double() - expected).abs().max()) < 1e-6, name
        # Without DP: the same global batches as one process, so the same model and metrics.
        params, epoch = results[0][f"plain_{name}"]
        params1, epoch1 = single[f"plain_{name}"]
        assert float((params - params1).abs().max()) < 1e-6, name
        assert epoch.examples == epoch1.examples == EQ_N and epoch.steps == epoch1.steps
        assert abs(epoch.loss - epoch1.loss) < 1e-6 and epoch.accuracy == epoch1.accuracy


def test_resume_continues_exactly_in_two_ranks(launched):
    launches, out = launched(2)
    results = [r["resume"] for r in launches]
    for name in ENGINES:
        reference, params, resumed, params_resumed = results[0][name]
        assert resumed == reference and torch.equal(params_resumed, params)
        assert torch.equal(results[1][name][3], params)
    # A state of two ranks does not fit a single process (its sampling streams differ).
    state = torch.load(out / "state_fast.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rank_generators"]) == 2
    engine = build("fast", DistContext(), n=60, batch_size=10, dp=DP(noise_multiplier=0.7, max_grad_norm=1.0))
    with pytest.raises(ValueError, match="2 rank"):
        engine.load_state_dict(state)


@pytest.mark.slow
@pytest.mark.parametrize("how, world", [("raise", 3), ("exit", 2), ("hang", 2)])
def test_a_failed_rank_stops_the_others(how, world, tmp_path):
    survivors = [r for r in range(world) if r != 1]
    codes, _, errors, seconds = launch(world, "failure", tmp_path, wait_for=survivors, how=how, timeout_s=3)
    assert seconds < JOIN_TIMEOUT_S  # they ended by themselves (rank 1 may still hang: it is killed)
    assert all(codes[r] not in (0, None) for r in survivors), (codes, errors)
    for r in survivors:
        assert RankFailureError.__name__ in errors[r]
        if how == "raise":
            assert "rank 1 failed with ValueError: injected failure" in errors[r], errors[r]
        else:
            assert "rank 1 did not answer" in errors[r], errors[r]


def test_single_process_context_and_sharding():
    dist = DistContext()
    assert dist.stream("sampling") == "sampling" and dist.is_main and not dist.is_distributed
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.all_gather_object(3) == [3]
    shards = [shard_indices(10, rank=r, world_size=3) for r in range(3)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="rank"):
        DistContext(rank=2, world_size=2, backend="gloo")


def test_world_of_one_is_the_single_process_engine():
    """device=DistContext() (a world of one) changes nothing: same bytes as device="cpu"."""
    dp = DP(noise_multiplier=1.0, max_grad_norm=1.0)
    for name in ENGINES:
        a = build(name, DistContext(), n=60, batch_size=10, dp=dp, seed=4)
        b = build(name, None, n=60, batch_size=10, dp=dp, seed=4)
        assert a.train_epoch() == b.train_epoch()
        assert torch.equal(flat_params(a.model), flat_params(b.model))
        assert list(a.state_dict()) == list(b.state_dict())

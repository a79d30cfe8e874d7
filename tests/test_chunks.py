"""Static-shape chunks of Poisson batches: every sampled example in exactly one chunk, padding only to
a bucket, and the fast engine's bucketed run equal to the one padded to the capacity and to Opacus."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dpvision.engines import OptimizerSpec
from dpvision.engines.chunks import bucket_width, chunk_capacity, likely_sizes, padded_size, plan_chunks
from dpvision.models import SampleConvNet
from dpvision.seeding import make_generator
from tests.engine_helpers import DP, fast_engine
from tests.test_fast_engine import HAS_CUDA, flat, mnist_like, opacus_reference, rel


def test_capacity_and_bucket_at_the_seed_batch():
    q = 256 / 60000
    assert chunk_capacity(256, q, 60000, 4096) == 328  # 256 + ceil(4 sd) + 1 = 321, to a multiple of 8
    assert bucket_width(256, q) == 8  # sd 15.97 -> 8
    assert bucket_width(4096, 4096 / 60000) == 32  # sd 61.8 -> 31 -> 32
    assert chunk_capacity(4096, 4096 / 60000, 60000, 2048) == 1456  # 4096 + 248 + 1 = 4345 in 3 chunks
    assert chunk_capacity(10, 0.5, 20, 4096) == 20  # never more than the data set


@pytest.mark.parametrize(("capacity", "bucket"), [(328, 8), (33, 8), (40, 0), (7, 8)])
def test_plan_covers_every_example_once(capacity, bucket):
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 3 * capacity, (200,), generator=g).tolist() + [0, capacity, capacity + 1]
    chunks = plan_chunks(counts, capacity, bucket)
    covered = [i for c in chunks for i in range(c.start, c.start + c.length)]
    assert covered == list(range(sum(counts)))  # in order, each once
    for step, count in enumerate(counts):
        mine = [c for c in chunks if c.step == step]
        assert sum(c.length for c in mine) == count and len(mine) == math.ceil(count / capacity)
    for c in chunks:
        assert 1 <= c.length <= c.size <= capacity
        assert c.size == capacity or (bucket and c.size % bucket == 0 and c.size - c.length < bucket)


def test_likely_sizes_are_the_buckets_around_the_mean():
    q = 256 / 60000
    sizes = likely_sizes(256, q, 328, 8)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 304 and sizes[-1] == 208  # 256 +- 3 sd
    assert all(s % 8 == 0 for s in sizes) and len(sizes) == 13
    assert padded_size(0, 328, 8) == 8 and padded_size(300, 328, 0) == 328


def test_buckets_equal_the_capacity_padding_and_opacus():
    """Padded chunks of bucket sizes (weight-0 slots) give Opacus's update, as the single padded size does."""
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(2)
    data, model = mnist_like(600), SampleConvNet()
    spec, dp, steps, seed = OptimizerSpec(lr=0.5), DP(noise_multiplier=0.0, max_grad_norm=0.05), 4, 3
    updates, sizes = [], []
    for bucket in (None, 0):
        engine = fast_engine(model=copy.deepcopy(model), train_data=data, batch_size=64, optimizer=spec, dp=dp,
                             seed=seed, static_shapes=True, bucket=bucket)
        seen, run = [], engine.step.chunk
        engine.step.chunk = lambda idx, seen=seen, run=run: (seen.append(len(idx)), run(idx))[1]
        engine.train_epoch(max_steps=steps)
        updates.append(flat(engine.model.parameters()) - flat(model.parameters()))
        sizes.append(seen)
    assert engine.bucket == 0 and set(sizes[1]) == {engine.chunk}  # the capacity every time
    assert all(s % 8 == 0 and s < engine.chunk for s in sizes[0])  # buckets of 8 below the capacity 96
    assert sum(sizes[0]) < sum(sizes[1]) - 4 * 8
    masks = torch.rand(steps, len(data), generator=make_generator(seed, "sampling")) < engine.sample_rate
    ref = opacus_reference(copy.deepcopy(model), data, masks, spec=spec, dp=dp, sample_rate=engine.sample_rate,
                           device="cpu")
    ref_update = flat(ref.parameters()) - flat(model.parameters())
    assert rel(updates[0], ref_update) < 1e-5 and rel(updates[1], ref_update) < 1e-5


def test_negative_bucket_refused():
    with pytest.raises(ValueError, match="bucket must be >= 0"):
        fast_engine(model=SampleConvNet(), train_data=mnist_like(64), batch_size=16, optimizer=OptimizerSpec(lr=0.1),
                    dp=DP(noise_multiplier=1.0, max_grad_norm=1.0), seed=0, bucket=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA")
def test_bucket_graphs_share_a_pool_and_match_eager():
    """One graph per bucket in one memory pool, replayed in any order: the same update as eager chunks."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(5)
    data, model = mnist_like(6000), SampleConvNet()
    out = []
    for graphs in (False, True):
        engine = fast_engine(model=copy.deepcopy(model), train_data=data, batch_size=256,
                             optimizer=OptimizerSpec(lr=0.5, momentum=0.9),
                             dp=DP(noise_multiplier=0.0, max_grad_norm=0.1), seed=4, device="cuda",
                             cuda_graphs=graphs, static_shapes=True, precision="fp32")
        engine.train_epoch()
        assert engine.graphs.enabled == graphs
        out.append(flat(engine.model.parameters()) - flat(model.parameters()))
    assert len(engine.graphs.graphs) >= 10 and engine.graphs.pool is not None
    assert rel(out[1], out[0]) < 1e-5


@pytest.mark.parametrize(("expected", "q", "capacity", "bucket"), [(256, 256 / 60000, 328, 8), (4096, 0.07, 1456, 32),
                                                                     (20, 0.5, 33, 8)])
def test_likely_sizes_are_those_of_the_plans(expected, q, capacity, bucket):
    sd = math.sqrt(expected * (1 - q))
    counts = list(range(max(1, math.floor(expected - 3 * sd)), math.ceil(expected + 3 * sd) + 1))
    planned = {c.size for c in plan_chunks(counts, capacity, bucket)}
    assert likely_sizes(expected, q, capacity, bucket) == sorted(planned, reverse=True)

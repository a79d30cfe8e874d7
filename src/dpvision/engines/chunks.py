"""Static shapes for Poisson batches: chunk capacity, size buckets and each step's chunks.

A Poisson batch has a random size (mean E[B] = N q, sd sqrt(N q (1 - q))), but a captured CUDA
graph has fixed shapes. The fast engine therefore runs every step as chunks of a few fixed sizes:

* the *capacity* (largest chunk) is E[B] + ``PAD_SIGMAS`` sd, split so that no chunk exceeds the
  physical limit; a step with more examples runs extra chunks (nothing sampled is ever dropped);
* each step's last chunk is padded only up to the next *bucket*, a multiple of about sd / 2
  (at least 8), so a step carries on average about sd / 4 weight-0 padding slots (1.6% at
  E[B] = 256) instead of the 2 sd (12%) of a single padded size. Every bucket is one CUDA graph;
  the graphs share one memory pool, so memory is that of the largest.

Padding slots hold index -1: the engine gives them weight 0, so they change no sum.

Example (E[B] = 256 of N = 60,000):
    >>> cap = chunk_capacity(256, 256 / 60000, 60000, 4096)
    >>> cap, bucket_width(256, 256 / 60000)
    (328, 8)
    >>> [(c.step, c.start, c.length, c.size) for c in plan_chunks([250, 0, 400], cap, 8)]
    [(0, 0, 250, 256), (2, 250, 328, 328), (2, 578, 72, 72)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Chunk capacity = E[B] + PAD_SIGMAS sd. With buckets a large capacity costs nothing on ordinary steps;
# 4 sd makes an overflow (an extra chunk) rare: about 3e-5 of steps.
PAD_SIGMAS = 4.0
# Buckets of batch sizes within E[B] +- PRECAPTURE_SIGMAS sd (99.7% of steps) are captured before the
# first step, largest first (the shared memory pool is sized once); rarer sizes when first seen.
PRECAPTURE_SIGMAS = 3.0
MIN_BUCKET = 8  # multiples of 8 keep tensor-core friendly shapes


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def batch_sd(expected: int, sample_rate: float) -> float:
    """Standard deviation of a Poisson-sampled batch size of mean ``expected``."""
    return math.sqrt(max(expected * (1 - sample_rate), 0.0))


def chunk_capacity(expected: int, sample_rate: float, num_examples: int, max_physical: int,
                   pad_sigmas: float = PAD_SIGMAS) -> int:
    """Largest chunk for a Poisson batch of mean ``expected``: mean + k sd, split to fit ``max_physical``."""
    cap = min(expected + math.ceil(pad_sigmas * batch_sd(expected, sample_rate)) + 1, num_examples)
    chunks = math.ceil(cap / max_physical)
    size = math.ceil(cap / chunks)
    return _round_up(size, MIN_BUCKET) if size >= 64 else size


def bucket_width(expected: int, sample_rate: float) -> int:
    """Granularity of padded chunk sizes: sd / 2 rounded up to a multiple of ``MIN_BUCKET``."""
    return max(MIN_BUCKET, _round_up(math.ceil(batch_sd(expected, sample_rate) / 2), MIN_BUCKET))


def padded_size(length: int, capacity: int, bucket: int) -> int:
    """The bucket a chunk of ``length`` real examples is padded to (``bucket`` = 0: always the capacity)."""
    if bucket <= 0:
        return capacity
    return min(capacity, _round_up(max(length, 1), bucket))


@dataclass(frozen=True)
class Chunk:
    step: int  # the step (within the block) it belongs to
    start: int  # offset of its first example in the block's flat list of sampled indices
    length: int  # real examples, 1 <= length <= size
    size: int  # padded size: its graph's batch dimension


def plan_chunks(counts: list[int], capacity: int, bucket: int) -> list[Chunk]:
    """The chunks of a block of steps whose batch sizes are ``counts``, in order.

    A step of c examples runs ceil(c / capacity) chunks: full ones, then the rest padded to its
    bucket. An empty step runs none (its clipped sum is exactly zero)."""
    out, offset = [], 0
    for step, count in enumerate(counts):
        for k in range(math.ceil(count / capacity)):
            length = min(capacity, count - k * capacity)
            out.append(Chunk(step, offset + k * capacity, length, padded_size(length, capacity, bucket)))
        offset += count
    return out


def likely_sizes(expected: int, sample_rate: float, capacity: int, bucket: int,
                 sigmas: float = PRECAPTURE_SIGMAS) -> list[int]:
    """Padded sizes of the chunks of every batch size within ``sigmas`` sd of the mean, largest first."""
    sd = batch_sd(expected, sample_rate)
    low, high = max(1, math.floor(expected - sigmas * sd)), math.ceil(expected + sigmas * sd)
    sizes = set()
    for count in range(low, high + 1):  # full chunks of the capacity, then the rest padded to its bucket
        full = (count - 1) // capacity
        sizes.add(padded_size(count - full * capacity, capacity, bucket))
        if full:
            sizes.add(capacity)
    return sorted(sizes, reverse=True)

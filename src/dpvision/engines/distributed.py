"""Data-parallel DP-SGD on ``torch.distributed``: the process group and the sharding both engines use.

A run launched by ``torchrun`` has one process (rank) per device. Every rank
holds the same model and optimizer state and takes the same steps:

* **Sampling.** Rank r owns the shard ``r::world`` of the N training examples and
  includes each example of its shard independently with the global rate
  q = 1 / ceil(N / B). The shards partition the set, so the union over ranks is
  exactly Poisson sampling of the whole set at q: the accountant is unchanged.
  Rank r's sampling generator is the stream ``"sampling/rank{r}"`` (no two ranks
  share a stream); a world of one keeps the single-process name ``"sampling"``.
* **Noise once.** Each rank sums its clipped per-example gradients; rank 0 adds
  one Gaussian draw of std σC to its sum; the sums are all-reduced; every rank
  divides by the global expected batch size int(N q). The update is the same
  bytes on every rank (an all-reduce hands every rank the same result) and
  carries noise σC, exactly as on one device.
* **Without DP**: every rank draws the same shuffled order (shared stream
  ``"data_order"``), takes its slice ``r::world`` of each global batch of B,
  and the gradient sums are all-reduced and divided by the global batch length:
  the mean loss of the global batch, as on one device.

:class:`DistContext` is dpvision's one door to ``torch.distributed`` (Opacus's ``DPDDP``
and ``DistributedDPOptimizer`` call it themselves, inside :meth:`DistContext.collective`). Its
collectives carry a bounded timeout and turn a peer's failure into
:class:`RankFailureError`, whose message names the failed rank when it can be
known (a rank that raises records itself in the rendezvous store on its way out,
see :meth:`DistContext.__exit__`).

Example (single process: every collective is a no-op):
    >>> dist = DistContext.from_env()  # no torchrun variables here
    >>> (dist.rank, dist.world_size, dist.is_main, dist.backend)
    (0, 1, True, None)
    >>> dist.all_reduce_sum_(torch.ones(2))
    tensor([1., 1.])
    >>> shard_indices(10, rank=1, world_size=3)
    tensor([1, 4, 7])
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as td
from torch import nn
from torch.utils.data import Sampler


DEFAULT_TIMEOUT_S = 300.0  # a collective waits at most this long for a silent peer
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets
FAULT_PREFIX = "dpvision/fault/"  # rendezvous-store keys: failed/{rank} (message), alive/{rank}
FAULT_GRACE_S = 2.0  # how long a survivor waits for peers to check in before naming the silent ones
BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


class RankFailureError(RuntimeError):
    """A collective failed because another rank died, raised or went silent past the timeout."""


@dataclass(kw_only=True)
class DistContext:
    """Where this process stands in a data-parallel run (a world of one when not launched distributed).

    ``device`` is this rank's device: ``cuda:{local_rank}`` with NCCL, the CPU with gloo.
    ``backend`` is ``None`` when no process group was initialised.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {self.rank} of world {self.world_size}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.world_size > 1 and self.backend is None:
            raise ValueError(f"a world of {self.world_size} ranks needs a backend (nccl or gloo)")

    # ----------------------------------------------------------------- making one
    @classmethod
    def from_env(cls, *, device: str | torch.device | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> "DistContext":
        """Join the process group torchrun describes (RANK, WORLD_SIZE, ...), or a world of one without it.

        ``device``: ``"cuda"`` (NCCL, this rank's GPU ``cuda:{LOCAL_RANK}``) or ``"cpu"`` (gloo); by
        default (or ``"auto"``) CUDA when available. A device index is ignored under torchrun: the rank's GPU is the
        local rank. ``timeout_s`` bounds every collective, and the rendezvous.
        """
        device = None if device == "auto" else device
        kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        if kind not in BACKENDS:
            raise ValueError(f"device must be cuda or cpu for distributed training, got {device!r}")
        if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:  # not launched by torchrun
            return cls(device=torch.device(device) if device is not None else torch.device(kind),
                       timeout_s=timeout_s)
        missing = [name for name in ENV_VARS if name not in os.environ]
        if missing:
            raise ValueError(f"torchrun environment incomplete: {', '.join(missing)} not set "
                             f"(launch with torchrun, or set all of {', '.join(ENV_VARS)})")
        try:
            rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        except ValueError:
            given = ", ".join(f"{k}={os.environ[k]!r}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
            raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {given}") from None
        dev = torch.device("cpu")
        if kind == "cuda":
            if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local_rank} needs GPU {local_rank}, but this node has "
                                 f"{torch.cuda.device_count()} (use --nproc-per-node <= the number of GPUs)")
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)  # NCCL and the object collectives use the current device
        ctx = cls(rank=rank, world_size=world, local_rank=local_rank, backend=BACKENDS[kind], device=dev,
                  timeout_s=timeout_s)
        if not td.is_initialized():
            td.init_process_group(ctx.backend, rank=rank, world_size=world,
                                  timeout=datetime.timedelta(seconds=timeout_s))
        return ctx

    # ----------------------------------------------------------------- facts
    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that writes files and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one rank: the engines shard, all-reduce and gather only then."""
        return self.world_size > 1

    def stream(self, name: str) -> str:
        """This rank's own generator stream: ``name`` in a world of one, else ``name/rank{r}``."""
        return f"{name}/rank{self.rank}" if self.is_distributed else name

    # ----------------------------------------------------------------- collectives
    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks in place (every rank gets the same bytes); returns it."""
        if self.is_distributed:
            with self.collective("all_reduce"):
                td.all_reduce(tensor, op=td.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` with rank ``src``'s, in place; returns it."""
        if self.is_distributed:
            with self.collective("broadcast"):
                td.broadcast(tensor, src)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable; put tensors on the CPU first, see :func:`to_cpu`) on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj if self.rank == src else None]
        with self.collective("broadcast_object"):
            td.broadcast_object_list(box, src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self.collective("all_gather_object"):
            td.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait until every rank gets here (at most ``timeout_s``)."""
        if self.is_distributed:
            # A one-element all-reduce behaves alike on both backends (NCCL's barrier() guesses a device).
            self.all_reduce_sum_(torch.zeros(1, device=self.device))

    def broadcast_module_(self, module: nn.Module, src: int = 0) -> None:
        """Make every parameter and buffer of ``module`` rank ``src``'s (a safety net for identical starts)."""
        if self.is_distributed:
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    self.broadcast_(t.data, src)

    def destroy(self) -> None:
        """Leave the process group (after the last collective; a no-op in a world of one)."""
        if self.backend is not None and td.is_initialized():
            td.destroy_process_group()

    # ----------------------------------------------------------------- faults
    @contextmanager
    def collective(self, op: str) -> Iterator[None]:
        """Run the collectives inside as ``op``; a backend failure becomes :class:`RankFailureError`.

        Gloo reports a dead peer or a timeout as a plain ``RuntimeError``; NCCL's watchdog
        aborts the process after ``timeout_s`` instead (torchrun then stops the other ranks).
        """
        if not self.is_distributed:
            yield
            return
        try:
            yield
        except RankFailureError:
            raise
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RankFailureError(f"rank {self.rank}: {op} failed: {self.diagnose()} ({first_line})") from err

    def report_failure(self, err: BaseException) -> None:
        """Record in the rendezvous store that this rank failed with ``err`` (so survivors can name it)."""
        store = self._store()
        if store is None:
            return
        message = f"{type(err).__name__}: {err}".strip().splitlines()[0][:300]
        try:
            store.set(f"{FAULT_PREFIX}failed/{self.rank}", message)
        except Exception:  # noqa: BLE001 (the store may be gone with its host; nothing more to do)
            pass

    def diagnose(self) -> str:
        """Which ranks failed: those that recorded an error, and those that do not answer within a grace."""
        store = self._store()
        if store is None:
            return "the process group is gone"
        failed: dict[int, str] = {}
        try:
            store.set(f"{FAULT_PREFIX}alive/{self.rank}", "1")
            deadline = time.monotonic() + FAULT_GRACE_S
            while True:
                for r in range(self.world_size):
                    if r not in failed and r != self.rank and store.check([f"{FAULT_PREFIX}failed/{r}"]):
                        failed[r] = store.get(f"{FAULT_PREFIX}failed/{r}").decode(errors="replace")
                answered = {r for r in range(self.world_size) if store.check([f"{FAULT_PREFIX}alive/{r}"])}
                silent = [r for r in range(self.world_size) if r not in answered and r not in failed]
                if failed and not silent or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        except Exception:  # noqa: BLE001 (an unreachable store: its host, rank 0 or the agent, is gone)
            return "the rendezvous store is unreachable (the rank hosting it, usually rank 0, has probably exited)"
        parts = [f"rank {r} failed with {msg}" for r, msg in sorted(failed.items())]
        if silent:
            parts.append(f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} did not answer "
                         f"(killed, or hung past the {self.timeout_s:g} s timeout)")
        return "; ".join(parts) if parts else "no other rank reported an error"

    def _store(self):
        if not self.is_distributed or not td.is_initialized():
            return None
        try:
            return td.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 (private API: naming ranks is best effort)
            return None

    def __enter__(self) -> "DistContext":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """On this rank's own error, record it for the others; on success, leave the group cleanly."""
        if exc is None:
            self.destroy()
        elif not isinstance(exc, RankFailureError):
            self.report_failure(exc)
        # After a failure the group is left alone: destroying it could wait on the dead peer.


# --------------------------------------------------------------------- sharding and sampling
def shard_indices(num_examples: int, *, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s examples: ``rank::world_size`` (int64 [ceil((N - rank) / W)]). Shards partition 0..N-1."""
    return torch.arange(rank, num_examples, world_size)


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) moved to the CPU: safe to pickle to any rank."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def check_world(state: dict, dist: DistContext) -> None:
    """Refuse an engine state saved by a different number of ranks (its sampling streams would not fit)."""
    saved = int(state.get("world_size", 1))
    if saved != dist.world_size:
        raise ValueError(f"checkpoint was written by a run of {saved} rank(s), this run has {dist.world_size}: "
                         f"resume with the same number of processes (torchrun --nproc-per-node/--nnodes)")


class ShardPoissonBatchSampler(Sampler[list[int]]):
    """This rank's Poisson batches: each example of its shard independently with probability q, every step.

    Yields exactly ``steps`` batches of global dataset indices, empty ones included: every
    rank must take every step (Opacus's ``DistributedUniformWithReplacementSampler`` skips
    an empty local batch, which would put the ranks' all-reduces out of step and make the
    local sampling no longer Poisson).
    """

    def __init__(self, *, num_examples: int, sample_rate: float, steps: int, dist: DistContext,
                 generator: torch.Generator) -> None:
        self.shard = shard_indices(num_examples, rank=dist.rank, world_size=dist.world_size)  # [n_local]
        self.sample_rate, self.steps, self.generator = sample_rate, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(len(self.shard), generator=self.generator) < self.sample_rate  # [n_local]
            yield self.shard[mask].tolist()


class ShardShuffleBatchSampler(Sampler[list[int]]):
    """Without DP: one shuffled order shared by all ranks; this rank's slice ``r::W`` of each global batch."""

    def __init__(self, *, num_examples: int, batch_size: int, dist: DistContext, generator: torch.Generator) -> None:
        self.num_examples, self.batch_size, self.dist, self.generator = num_examples, batch_size, dist, generator

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_examples, generator=self.generator)  # [N], the same on every rank
        for start in range(0, self.num_examples, self.batch_size):
            yield order[start:start + self.batch_size][self.dist.rank::self.dist.world_size].tolist()


def all_reduce_grads_(params: list[torch.Tensor], dist: DistContext) -> None:
    """Sum ``p.grad`` over ranks for every parameter, in one flat all-reduce (missing grads count as 0)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # [P]
    dist.all_reduce_sum_(flat)
    offset = 0
    for p, g in zip(params, grads):
        g.copy_(flat[offset:offset + g.numel()].view_as(g))  # in place: CUDA graphs own these addresses
        offset += g.numel()
        p.grad = g


def reduce_epoch_totals(dist: DistContext, loss_sum: float, correct: float, examples: int) -> tuple[float, float, int]:
    """Global (loss sum, number correct, examples) of an epoch: each rank's sums, added over ranks."""
    totals = torch.tensor([loss_sum, correct, float(examples)], dtype=torch.float64, device=dist.device)
    dist.all_reduce_sum_(totals)
    loss_sum, correct, examples = totals.tolist()
    return loss_sum, correct, int(round(examples))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (for a local rendezvous: tests, the benchmark)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------- engine state
def engine_state(dist: DistContext, common: dict, generators: dict[str, torch.Generator]) -> dict:
    """An engine's ``state_dict``: ``common`` (model, optimizer: the same on every rank) and the generators.

    In a world of one: ``{**common, name: state, ...}`` (the single-process format). Distributed:
    ``{**common, "world_size": W, "rank_generators": [rank 0's {name: state}, rank 1's, ...]}``,
    gathered from every rank, so every rank must call it (and every rank gets the whole state).
    """
    states = {name: g.get_state() for name, g in generators.items()}
    if not dist.is_distributed:
        return {**common, **states}
    return {**common, "world_size": dist.world_size, "rank_generators": dist.all_gather_object(to_cpu(states))}


def load_engine_state(dist: DistContext, state: dict | None, generators: dict[str, torch.Generator]) -> dict:
    """Set this rank's ``generators`` from an :func:`engine_state` and return the state (model, optimizer).

    Distributed, every rank must call it and rank 0's ``state`` is the one used (the others may pass
    ``None``): it is broadcast, so every rank restores the same model and optimizer and its own generators.
    """
    if dist.is_distributed:
        state = dist.broadcast_object(to_cpu(state) if dist.is_main else None)
    if not isinstance(state, dict):
        raise ValueError(f"engine state must be a dict from state_dict(), got {type(state).__name__}")
    check_world(state, dist)
    mine = state["rank_generators"][dist.rank] if dist.is_distributed else state
    for name, generator in generators.items():
        generator.set_state(mine[name])
    return state

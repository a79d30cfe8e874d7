"""The one place where randomness is created.

dpvision never relies on hidden global random state for anything that changes a
result: data order, Poisson sampling and DP noise each get their own explicit
``torch.Generator`` derived from the run's seed and a stream name, so that
adding a new random consumer never shifts the numbers an old one sees.

Example:
    >>> g = make_generator(0, "sampling")
    >>> a = torch.rand(2, generator=g)
    >>> torch.equal(a, torch.rand(2, generator=make_generator(0, "sampling")))
    True
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

def derive_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for ``stream``, a pure function of (seed, stream)."""
    digest = hashlib.sha256(f"dpvision:{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(seed: int, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded for ``stream``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, stream))
    return gen


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators (weight initialisation uses them).

    Also asks torch for deterministic kernels where they exist, so that the same
    seed on the same machine gives the same bytes.
    """
    random.seed(derive_seed(seed, "python"))
    np.random.seed(derive_seed(seed, "numpy") % 2**32)
    torch.manual_seed(derive_seed(seed, "init"))
    torch.use_deterministic_algorithms(True, warn_only=True)

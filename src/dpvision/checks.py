"""The one-line checks every config dataclass makes in ``__post_init__`` (the recipe's sections, the DP
settings, the audit's config): a failed check is a ``ValueError`` naming the field or flag, what would be
valid, and what was given.

Example:
    >>> need(is_number(0.5) and 0.5 > 0, "dp.max_grad_norm", "a positive number", 0.5)
    >>> need(is_int(True), "optim.epochs", "an integer", True)
    Traceback (most recent call last):
    ...
    ValueError: optim.epochs must be an integer, got True
"""

from __future__ import annotations

import math
from typing import Any


def need(ok: bool, where: str, valid: str, value: Any) -> None:
    """Refuse ``value`` of ``where`` (a field like ``dp.delta`` or a flag like ``--k``) unless ``ok``."""
    if not ok:
        raise ValueError(f"{where} must be {valid}, got {value!r}")


def is_int(x: Any) -> bool:
    """An int, not a bool (YAML's ``true`` is no epoch count)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

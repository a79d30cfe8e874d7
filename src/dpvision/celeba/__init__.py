"""CelebA for one binary attribute: archive reading, demo archives, balanced subsets, preprocessing.

The public functions are loaded on first use (PEP 562), so that the command-line
tools can report a bad flag without first paying for ``import torch``.

Example:
    >>> from dpvision.celeba import make_demo_archive, build_subset, preprocess, load_split  # doctest: +SKIP
    >>> make_demo_archive("/tmp/celeba", n=2000, seed=0)                                        # doctest: +SKIP
    >>> build_subset("/tmp/celeba", "/tmp/subset", use_landmarks=True,                          # doctest: +SKIP
    ...              stratify_by=["interocular"], total=2000)
    >>> preprocess("/tmp/subset", "/tmp/pre")                                                    # doctest: +SKIP
    >>> train, meta = load_split("/tmp/pre", "train")                                           # doctest: +SKIP
"""

from __future__ import annotations

import importlib

from dpvision.celeba.archive import (
    ATTRIBUTE_NAMES, LANDMARK_COLUMNS, CelebaArchive, CelebaDataError, class_names, interocular_distance,
    read_archive, validate_attribute,
)  # fmt: skip

_LAZY = {
    "make_demo_archive": "dpvision.celeba.demo",
    "build_subset": "dpvision.celeba.subset",
    "caps_from_total": "dpvision.celeba.subset",
    "preprocess": "dpvision.celeba.preprocessing",
    "load_split": "dpvision.celeba.preprocessing",
    "add_subcommands": "dpvision.celeba.cli",
}

__all__ = [
    "ATTRIBUTE_NAMES", "LANDMARK_COLUMNS", "CelebaArchive", "CelebaDataError", "class_names",
    "interocular_distance", "read_archive", "validate_attribute", *_LAZY,
]  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpvision.celeba' has no attribute {name!r}")

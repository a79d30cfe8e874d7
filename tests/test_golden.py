"""The MNIST seed's CSV is byte-identical to what the code wrote before the one-training-job refactor.

The golden files (tests/golden/, see its README) were written on this kind of machine (2-core CPU,
torch 2.14.1, opacus 1.6.0) by commit dfb0e8d. Same seed, same CPU: same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpvision.jobs.mnist_seed import main

GOLDEN = Path(__file__).parent / "golden"
TINY = ["--k", "600", "--batch-size", "60", "--epochs", "2", "--test-batch-size", "2000", "--quiet"]
CASES = [
    ("mnist_seed_fast_dp.csv", ["--engine", "fast"], "mnist_0.15_1.3_1.0_60_2_0.3_600.csv"),
    ("mnist_seed_opacus_dp.csv", ["--engine", "opacus"], "mnist_0.15_1.3_1.0_60_2_0.3_600.csv"),
    ("mnist_seed_fast_nodp.csv", ["--engine", "fast", "--disable-dp"], "mnist_0.15_1.3_1.0_60_2_0.3_600.csv"),
    ("mnist_seed_fast_eps4_prv.csv", ["--engine", "fast", "--epsilon", "4", "--accountant", "prv"],
     "mnist_0.15_0.9492_1.0_60_2_4.0_600.csv"),
]


@pytest.mark.parametrize("golden, extra, name", CASES, ids=[c[0][11:-4] for c in CASES])
def test_seed_csv_is_byte_identical_to_the_pre_refactor_code(golden, extra, name, tmp_path, mnist_root):
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["--data-root", str(mnist_root), *TINY, *extra]) == 0
    finally:
        os.chdir(old)
    assert (tmp_path / "mnist" / name).read_bytes() == (GOLDEN / golden).read_bytes()
    # the run folder keeps its own copy
    assert (tmp_path / "runs" / "mnist" / Path(name).stem / name).read_bytes() == (GOLDEN / golden).read_bytes()

"""The MNIST seed's CSV is byte-identical to what the code wrote before the one-training-job refactor.

The golden files (tests/golden/, see its README) were written on this kind of machine (2-core CPU,
torch 2.14.1, opacus 1.6.0) by commit dfb0e8d. Same seed, same CPU: same bytes, except the last digits of
a PRV ε: Opacus's PRV accountant sums a numerical grid with numpy/scipy, whose releases reorder those sums
(numpy 2.4.6 / scipy 1.17.1 move ε by 3e-12 relative). So the Epsilon column of the PRV case is compared
to a relative 1e-9 (a real accounting change moves it far more); every other byte must match.
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
    expected = (GOLDEN / golden).read_bytes()
    assert_same_csv((tmp_path / "mnist" / name).read_bytes(), expected, prv="prv" in golden)
    # the run folder keeps its own copy
    assert_same_csv((tmp_path / "runs" / "mnist" / Path(name).stem / name).read_bytes(), expected, prv="prv" in golden)


def assert_same_csv(got: bytes, expected: bytes, *, prv: bool) -> None:
    """Byte for byte; with ``prv`` the Epsilon column (4th) to a relative 1e-9 (see the module docstring)."""
    if not prv:
        assert got == expected
        return
    got_rows, expected_rows = got.decode().splitlines(), expected.decode().splitlines()
    assert len(got_rows) == len(expected_rows) and got.endswith(b"\n") == expected.endswith(b"\n")
    for mine, theirs in zip(got_rows, expected_rows):
        a, b = mine.split(","), theirs.split(",")
        assert len(a) == len(b) == 5 and a[:3] + a[4:] == b[:3] + b[4:], (mine, theirs)
        if a[3] != b[3]:
            assert float(a[3]) == pytest.approx(float(b[3]), rel=1e-9, abs=0), (mine, theirs)


def test_prv_comparison_still_catches_a_changed_epsilon():
    row = b"Epoch,Train Accuracy,Test Accuracy,Epsilon,Delta\n1,0.1,0.2,3.188996562714759,1e-05\n"
    assert_same_csv(row.replace(b"3.188996562714759", b"3.1889965627055643"), row, prv=True)  # numpy/scipy noise
    with pytest.raises(AssertionError):
        assert_same_csv(row.replace(b"3.188996562714759", b"3.1889970000000000"), row, prv=True)
    with pytest.raises(AssertionError):
        assert_same_csv(row.replace(b"0.2,", b"0.3,"), row, prv=True)

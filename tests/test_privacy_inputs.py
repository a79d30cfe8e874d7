"""Issue 13, item 1: every quantity the accountant uses comes from the data actually trained on.

A CelebA folder whose ``stats.json`` claims another training-set size (100000, or 20) than ``train.pt``
holds must not change q, δ (auto) or the calibrated σ: the printed ε must be the ε of the run that
happened.
"""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant

from dpvision.jobs.celeba_seed import main as celeba_main
from tests.data_fixtures import write_celeba_folder

N_TRAIN = 60


@pytest.mark.parametrize("claimed", [100_000, 20])
def test_edited_counts_do_not_change_the_accounting(claimed, tmp_path, capsys):
    honest = write_celeba_folder(tmp_path / "honest", N_TRAIN, 10, 10, size=16)
    edited = write_celeba_folder(tmp_path / "edited", N_TRAIN, 10, 10, size=16)
    stats = json.loads((edited / "stats.json").read_text())
    stats["counts"]["train"] = claimed
    (edited / "stats.json").write_text(json.dumps(stats))
    summaries = {}
    for name, folder in (("honest", honest), ("edited", edited)):
        args = ["--data", str(folder), "--target-epsilon", "2", "--epochs", "2", "--batch-size", "15",
                "--runs-dir", str(tmp_path / f"runs_{name}"), "--quiet", "--device", "cpu"]
        assert celeba_main(args) == 0, capsys.readouterr().err
        (run,) = (tmp_path / f"runs_{name}" / "celeba_dp").iterdir()
        summaries[name] = json.loads((run / "summary.json").read_text())
    edited_summary, honest_summary = summaries["edited"], summaries["honest"]
    for key in ("num_train", "sample_rate", "delta", "noise_multiplier", "steps", "epsilon"):
        assert edited_summary[key] == honest_summary[key], key
    assert edited_summary["num_train"] == N_TRAIN
    assert edited_summary["delta"] == 1 / (10 * N_TRAIN)  # δ auto from the tensors, not from stats.json
    assert edited_summary["sample_rate"] == 1 / 4  # q = 1 / ceil(60 / 15)
    # the printed ε is Opacus's ε for the steps taken at that q and σ, and within the target
    accountant = RDPAccountant()
    accountant.history = [(edited_summary["noise_multiplier"], 0.25, edited_summary["steps"])]
    assert edited_summary["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1 / (10 * N_TRAIN)), rel=1e-12)
    assert edited_summary["epsilon"] <= 2.0

"""Issue 13, item 1: every quantity the accountant uses comes from the data actually trained on.

A CelebA folder whose ``stats.json`` claims another training-set size (100000, or 20) than ``train.pt``
holds must not change q, δ (auto) or the calibrated σ: the printed ε must be the ε of the run that
happened.
"""

from __future__ import annotations

import json
import warnings

import pytest
from opacus.accountants import RDPAccountant

from dpvision.jobs.celeba_seed import main as celeba_main
from dpvision.privacy.plan import DPSettings, make_plan
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


def test_delta_at_least_one_over_n_is_refused_unless_insisted():
    """Issue 21: --delta 0.5 with N = 30,000 used to report "ε = 0.0000 (δ = 0.5)" and exit 0."""
    plan = dict(num_train=30_000, batch_size=256, epochs=1)
    with pytest.raises(ValueError) as err:
        make_plan(DPSettings(noise_multiplier=1.0, delta=0.5), **plan)
    assert str(err.value).startswith("dp.delta 0.5 is at least 1/N = 3.33e-05 (N = 30000 training examples)")
    assert "well below 1/N" in str(err.value) and "dp.allow_large_delta" in str(err.value)
    with pytest.raises(ValueError, match="is at least 1/N"):
        make_plan(DPSettings(noise_multiplier=1.0, delta=1 / 30_000), **plan)  # exactly 1/N is refused too
    with pytest.warns(UserWarning, match="above 1/\\(10 N\\)"):
        assert make_plan(DPSettings(noise_multiplier=1.0, delta=0.5, allow_large_delta=True), **plan).delta == 0.5
    assert make_plan(DPSettings(enabled=False, delta=0.5), **plan).delta == 0.5  # no DP, no privacy claim to protect


def test_delta_above_one_over_ten_n_warns_once_in_one_line():
    plan = dict(num_train=30_000, batch_size=256, epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for delta in (1e-5, "auto", 1e-6):  # the MNIST seed's default (above 1/(10 N) = 3.3e-6, below 1/N);
            make_plan(DPSettings(noise_multiplier=1.0, delta=delta), **plan)  # exactly 1/(10 N): no warning
    assert [str(w.message) for w in caught] == [
        "dp.delta 1e-05 is above 1/(10 N) = 3.33e-06 (N = 30000): delta should be well below 1/N "
        "('auto' gives 1/(10 N))"]

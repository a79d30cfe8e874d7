"""Private input normalisation of ScatterNet features (``model.input_norm: private``, issue 24).

The mechanism (clip each example's channel statistics, sum, Gaussian noise once from a seeded generator,
divide by N), its accounting (the ledger starts with (σ_norm, 1, 2), composed with DP-SGD by the real
Opacus and dp_accounting accountants, in every ε and in σ's calibration), the job wiring (a buffer of
the model, carried by model.pt and the checkpoint; a resume neither recomputes nor re-spends it) and
bad values (exit 2 naming the field). Tiny synthetic MNIST on the CPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from opacus.accountants import PRVAccountant, RDPAccountant

from dpvision.cli import main
from dpvision.data.tensors import ImageTensors
from dpvision.engines.distributed import DistContext, free_port
from dpvision.jobs import setup
from dpvision.jobs.config import TrainConfig
from dpvision.jobs.setup import fit_private_input_norm, load_data
from dpvision.jobs.train import run
from dpvision.models import build_model
from dpvision.models.input_norm import ChannelStandardize, channel_statistics, clip_rows, moment_sums
from dpvision.privacy import DPSettings, PrivacyBudget, PrivacyLedger, compute_epsilon, make_plan
from tests.job_helpers import Interrupt, exit_code, interrupt_at, metrics, summary

SIGMA_NORM = 8.0
RELEASE = (SIGMA_NORM, 1.0, 2)


def tiny_config(root, runs_dir, name: str, **sections) -> TrainConfig:
    """ScatterNet + linear with private normalisation on 32 examples: q = 1/2, 2 steps an epoch, 2 epochs."""
    values = {"data": {"root": str(root), "k": 32, "download": False},
              "model": {"name": "scatternet_linear", "input_norm": "private"},
              "optim": {"epochs": 2, "batch_size": 16, "lr": 0.5, "eval_batch_size": 16},
              "dp": {"noise_multiplier": 3.0},
              "run": {"runs_dir": str(runs_dir), "run_name": name, "device": "cpu", "quiet": True,
                      "test_every_epoch": False}}
    for section, given in sections.items():
        values[section] = {**values[section], **given}
    return TrainConfig.from_dict(values)


def opacus_epsilon(kind, history, delta: float, **options) -> float:
    accountant = kind()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta, **options)


@pytest.fixture(scope="module")
def private_run(tiny_mnist_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    run(tiny_config(tiny_mnist_root, runs, "p"), announce=False)
    return runs / "mnist" / "p"


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # Opacus's PRV at q = 1 (log(1 - q))
def test_run_epsilon_is_the_accountants_epsilon_with_the_release(private_run):
    result = summary(private_run)
    q, steps, delta = result["sample_rate"], result["steps"], result["delta"]
    assert (q, steps, result["releases"]) == (0.5, 4, [list(RELEASE)])
    with_release = [RELEASE, (3.0, q, steps)]
    rdp = opacus_epsilon(RDPAccountant, with_release, delta)
    assert result["epsilon"] == pytest.approx(rdp, rel=1e-12)
    assert result["epsilons"]["prv"] == pytest.approx(
        opacus_epsilon(PRVAccountant, with_release, delta, eps_error=0.01, delta_error=delta * 1e-3), rel=1e-9)
    without = opacus_epsilon(RDPAccountant, [(3.0, q, steps)], delta)
    assert rdp > without + 0.1
    rows = metrics(private_run)  # every epoch's row, every rigorous accountant, includes it
    first = compute_epsilon([RELEASE, (3.0, q, 2)], delta=delta, accountant="pld")
    assert float(rows[0]["epsilon_pld"]) == pytest.approx(first, rel=1e-6)
    assert float(rows[-1]["epsilon_rdp"]) == pytest.approx(rdp, rel=1e-6)


def test_model_pt_and_checkpoint_carry_the_statistics(private_run):
    weights = torch.load(private_run / "model.pt", weights_only=True)
    mean, var = weights["norm.mean"], weights["norm.var"]
    assert mean.shape == var.shape == (81,) and bool((var >= 0).all()) and float(mean.abs().sum()) > 0
    state = torch.load(private_run / "checkpoint.pt", weights_only=False)
    assert torch.equal(state["engine"]["model"]["norm.mean"], mean)
    assert state["ledger"]["history"][0] == list(RELEASE)


def test_resume_keeps_the_buffer_and_spends_it_once(private_run, tiny_mnist_root, tmp_path, monkeypatch):
    config = tiny_config(tiny_mnist_root, tmp_path, "r")
    with pytest.raises(Interrupt):
        run(config, announce=False, hook=interrupt_at("epoch", 1))
    folder = tmp_path / "mnist" / "r"

    def refuse(*args, **kwargs):
        raise AssertionError("the statistics were computed again on resume")

    monkeypatch.setattr("dpvision.jobs.setup.fit_input_norm", refuse)
    resumed = run(resume=folder, announce=False)
    reference = summary(private_run)
    assert resumed["epsilon"] == reference["epsilon"] and resumed["steps"] == 4
    state = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert [entry for entry in state["ledger"]["history"] if entry == list(RELEASE)] == [list(RELEASE)]
    for name in ("norm.mean", "norm.var", "classifier.weight"):
        assert torch.equal(torch.load(folder / "model.pt", weights_only=True)[name],
                           torch.load(private_run / "model.pt", weights_only=True)[name])


def test_calibration_to_target_includes_the_release():
    dp = DPSettings(target_epsilon=3.0, delta=1e-6)
    plan = make_plan(dp, num_train=60_000, batch_size=256, epochs=2, private_input_norm=True)
    plain = make_plan(dp, num_train=60_000, batch_size=256, epochs=2)
    assert plan.releases == (RELEASE,) and plain.releases == ()
    history = [RELEASE, (plan.noise_multiplier, plan.sample_rate, plan.total_steps)]
    assert 3.0 * (1 - 1e-3) <= opacus_epsilon(RDPAccountant, history, plan.delta) <= 3.0
    assert plan.noise_multiplier > plain.noise_multiplier
    off = make_plan(DPSettings(enabled=False), num_train=600, batch_size=20, epochs=1, private_input_norm=True)
    assert off.releases == ()  # without DP nothing is released under noise, nothing accounted


def test_target_below_the_release_alone_is_refused():
    with pytest.raises(ValueError, match=r"dp\.target_epsilon 0\.5 is not above the epsilon of the private input"):
        make_plan(DPSettings(target_epsilon=0.5, delta=1e-6), num_train=60_000, batch_size=256, epochs=1,
                  private_input_norm=True)
    with pytest.raises(ValueError, match=r"dp\.max_epsilon 0\.5 is not above"):
        make_plan(DPSettings(max_epsilon=0.5, delta=1e-6), num_train=60_000, batch_size=256, epochs=1, private_input_norm=True)


def features(n: int, k: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, k, 3, 3, generator=torch.Generator().manual_seed(seed))  # [n, K, h, w], norms < 2


def noisy(x: torch.Tensor, *, seed: int, sigma: float = 1.0, bound: float = 10.0):
    batches = (x[i:i + 64] for i in range(0, len(x), 64))  # bounded pieces, as the job feeds them
    return channel_statistics(lambda b: b, batches, num_examples=len(x), noise_multiplier=sigma, bound=bound,
                              generator=torch.Generator().manual_seed(seed))


def test_noisy_mean_is_within_the_noise_and_seeded():
    x = features(1000)
    exact_mean, exact_var = channel_statistics(lambda b: b, [x], num_examples=1000)
    flat = x.double().transpose(0, 1).reshape(4, -1)  # [K, N h w]
    assert torch.allclose(exact_mean, flat.mean(1)) and torch.allclose(exact_var, flat.var(1, unbiased=False))
    mean, var = noisy(x, seed=1)
    std = 1.0 * 10.0 / 1000  # σ_norm * bound / N per coordinate (no row reaches the bound: nothing clipped)
    assert float((mean - exact_mean).abs().max()) < 5 * std and not torch.equal(mean, exact_mean)
    again, var_again = noisy(x, seed=1)
    assert torch.equal(mean, again) and torch.equal(var, var_again)
    assert not torch.equal(mean, noisy(x, seed=2)[0])


def test_each_example_moves_each_sum_by_at_most_the_bound():
    x = features(50)
    outlier = torch.full((1, 4, 3, 3), 1e4)
    bound = 0.3
    before, after = moment_sums(x, bound), moment_sums(torch.cat([x, outlier]), bound)
    for sum_before, sum_after in zip(before, after):
        assert float((sum_after - sum_before).norm()) <= bound * (1 + 1e-12)
    rows = torch.tensor([[3.0, 4.0], [0.1, 0.2]])
    clipped = clip_rows(rows, 1.0)
    assert float(clipped[0].norm()) == pytest.approx(1.0) and torch.equal(clipped[1], rows[1])


def test_the_standardisation_is_a_fixed_affine_map():
    norm = ChannelStandardize(2)
    norm.set_statistics(torch.tensor([1.0, 2.0]), torch.tensor([4.0, 1.0]))
    x = torch.randn(3, 2, 5, 5)
    expected = (x - torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)) / torch.sqrt(torch.tensor([4.0, 1.0]) + 1e-5).view(
        1, 2, 1, 1)
    assert torch.allclose(norm(x), expected) and list(dict(norm.named_parameters())) == []
    model = build_model("scatternet_cnn", in_channels=1, num_classes=10, image_size=28, input_norm="private")
    assert isinstance(model.norm, ChannelStandardize)
    assert isinstance(build_model("scatternet_cnn", in_channels=1, num_classes=10, image_size=28).norm,
                      torch.nn.GroupNorm)


@pytest.mark.parametrize("setting, message", [
    ("model.input_norm=privat", "model.input_norm must be one of group, private, got 'privat'"),
    ("dp.input_norm_noise_multiplier=-1", "dp.input_norm_noise_multiplier must be a number in [0.1, 10000]"),
    ("dp.input_norm_bound=0", "dp.input_norm_bound must be a positive number, got 0"),
    # a setting the run would not use is refused, never silently ignored
    ("dp.input_norm_bound=0.5", "dp.input_norm_bound needs model.input_norm private (it is group)"),
    ("dp.input_norm_noise_multiplier=4", "dp.input_norm_noise_multiplier needs model.input_norm private"),
])
def test_bad_values_exit_2_naming_the_field(setting, message, tmp_path, capsys):
    argv = ["train", "--model", "scatternet_linear", "--runs-dir", tmp_path, "--set", setting]
    assert exit_code(main, argv) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_private_input_norm_needs_a_scatternet_model(tiny_mnist_root, tmp_path, capsys):
    argv = ["train", "--data-root", tiny_mnist_root, "--k", "32", "--runs-dir", tmp_path, "--set",
            "model.input_norm=private"]
    assert exit_code(main, argv) == 2
    err = capsys.readouterr().err
    assert "model.input_norm private is only available for scatternet_cnn and scatternet_linear, not " \
           "sample_convnet" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_baseline_statistics_are_exact_on_the_training_examples(tiny_mnist_root, tmp_path):
    """Without DP: no clipping, no noise, nothing accounted; the statistics are those of the k training
    examples (not of the validation split carved from them, nor of the test set)."""
    config = tiny_config(tiny_mnist_root, tmp_path, "b", data={"val_size": 8},
                         optim={"epochs": 1}).deactivated()
    result = run(config, announce=False)
    assert math.isinf(result["epsilon"]) and "releases" not in result
    train = load_data(config).train
    assert len(train) == 24
    model = build_model("scatternet_linear", in_channels=1, num_classes=10, image_size=28)
    with torch.no_grad():
        flat = model.scattering(train.normalize(train.images)).double().transpose(0, 1).flatten(1)  # [K, N h w]
    saved = torch.load(tmp_path / "mnist" / "b" / "model.pt", weights_only=True)
    assert torch.allclose(saved["norm.mean"].double(), flat.mean(1), rtol=1e-5, atol=1e-7)
    assert torch.allclose(saved["norm.var"].double(), flat.var(1, unbiased=False), rtol=1e-4, atol=1e-7)


def _fit_in_rank(rank: int, port: int, out: str) -> None:
    """One rank of a world of two (gloo): fit the statistics as the job does, save what this rank holds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank:  # only rank 0 may compute (and draw noise); the others receive its statistics
        setup.fit_input_norm = None
    with DistContext.from_env(device="cpu", timeout_s=60) as dist:
        torch.save(fit_stats(dist), Path(out) / f"rank{rank}.pt")


def fit_stats(dist: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The job's fit (fit_private_input_norm) on 40 random 8 x 8 images, σ_norm 8, seed 3."""
    g = torch.Generator().manual_seed(0)
    train = ImageTensors(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g),
                         torch.randint(0, 2, (40,), generator=g), (0.5,), (0.5,))
    config = TrainConfig.from_dict({"model": {"name": "scatternet_linear", "input_norm": "private"},
                                    "optim": {"batch_size": 8, "eval_batch_size": 16}, "run": {"seed": 3}})
    plan = make_plan(config.dp, num_train=40, batch_size=8, epochs=1, private_input_norm=True)
    model = build_model("scatternet_linear", in_channels=1, num_classes=2, image_size=8, input_norm="private")
    fit_private_input_norm(model, config, train, plan, dist)
    return model.norm.mean.clone(), model.norm.var.clone()


@pytest.mark.slow  # two spawned processes: ~12 s on 2 busy cores
def test_two_ranks_hold_the_one_release_of_rank_0(tmp_path):
    """Under torch.distributed rank 0 draws the noise, once, and every rank gets exactly its statistics:
    the single process's, for the same seed."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_fit_in_rank, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    alone = fit_stats(DistContext(device=torch.device("cpu")))
    for rank in range(2):
        mean, var = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(mean, alone[0]) and torch.equal(var, alone[1])


def test_budget_stop_reason_counts_optimizer_steps_not_releases():
    ledger = PrivacyLedger.starting_with([RELEASE])
    ledger.record(noise_multiplier=1.0, sample_rate=0.01, steps=3)
    reason = PrivacyBudget(max_epsilon=1.0, delta=1e-5).stop_reason(ledger, noise_multiplier=1.0, sample_rate=0.01)
    assert reason.startswith("privacy budget: after 3 steps epsilon = ")


def test_the_ledger_keeps_its_releases_apart_from_optimizer_steps():
    """A step of the release's own (σ, q) (full batch, σ = σ_norm) is not merged into it: the ledger counts
    optimizer steps only, its ε is the composition of both, and a state_dict carries the split."""
    ledger = PrivacyLedger.starting_with([RELEASE])
    ledger.record(noise_multiplier=SIGMA_NORM, sample_rate=1.0, steps=3)
    assert ledger.history == [RELEASE, (SIGMA_NORM, 1.0, 3)] and ledger.steps == 3
    assert ledger.epsilon(delta=1e-5) == compute_epsilon([(SIGMA_NORM, 1.0, 5)], delta=1e-5)
    again = PrivacyLedger()
    again.load_state_dict(ledger.state_dict())
    assert again == ledger and again.extended(noise_multiplier=1.0, sample_rate=0.5, steps=2).steps == 5


def test_a_checkpoint_whose_ledger_hides_its_release_is_refused(private_run, tmp_path):
    """The release written as optimizer steps (released 0): the history is the plan's, the split is not."""
    from dpvision.checkpoint import CheckpointError, check_ledger

    state = torch.load(private_run / "checkpoint.pt", weights_only=False)
    config = tiny_config(Path("unused"), tmp_path, "p")
    plan = make_plan(config.dp, num_train=32, batch_size=16, epochs=2, private_input_norm=True)
    logged = [int(row["steps"]) for row in state["extra"]["metrics"]]
    check_ledger(state, plan, None, logged=logged, path="checkpoint.pt")  # as written: accepted
    state["ledger"]["released"] = 0
    with pytest.raises(CheckpointError, match="privacy ledger"):
        check_ledger(state, plan, None, logged=logged, path="checkpoint.pt")


def test_a_group_norm_checkpoint_starts_a_private_model(tmp_path):
    """model.init from the same ScatterNet with its GroupNorm: every trained tensor loads, and the private
    normalisation's statistics (fitted by the run after loading) are not asked of the file."""
    from dpvision.models.init import load_init

    public = build_model("scatternet_linear", in_channels=1, num_classes=10, image_size=28)
    torch.save(public.state_dict(), tmp_path / "group.pt")
    model = build_model("scatternet_linear", in_channels=1, num_classes=10, image_size=28, input_norm="private")
    info = load_init(model, tmp_path / "group.pt")
    assert info["ignored"] == [] and torch.equal(model.classifier.weight, public.classifier.weight)
    assert set(model.state_dict()) - set(public.state_dict()) == {"norm.mean", "norm.var"}

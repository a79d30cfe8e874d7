"""The contrastive objective (dpvision.engines.contrastive): SimCLR's loss and views, pretraining without DP
through the one job, its refusals under DP, and its weights as a DP run's ``model.init``.

Tiny synthetic images from dpvision.data.synthetic (16x16, 3 channels) through ``dpvision.fit``, CPU, fp32.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import dpvision
from dpvision.data.synthetic import generate
from dpvision.data.tensors import ImageTensors
from dpvision.engines import FastOptions, OptimizerSpec
from dpvision.engines.contrastive import PROJECTION_DIM, nt_xent, resized_crops, views
from dpvision.jobs.config import TrainConfig
from dpvision.jobs.setup import few_steps_advice, plan_privacy
from dpvision.models import CelebaCNN

from .engine_helpers import fast_engine
from .job_helpers import metrics, read_csv

PRETRAIN = {"dp": {"enabled": False},
            "optim": {"objective": "contrastive", "epochs": 3, "batch_size": 64, "lr": 0.1, "momentum": 0.9},
            "run": {"device": "cpu", "quiet": True, "seed": 0}}


def reference_nt_xent(z: torch.Tensor, temperature: float) -> tuple[float, float]:
    """SimCLR's loss written out view by view (its definition), and the views whose nearest other is the partner."""
    z = F.normalize(z.double(), dim=1)
    n = len(z)
    total = found = 0.0
    for i in range(n):
        partner = (i + n // 2) % n
        others = [k for k in range(n) if k != i]
        logits = torch.stack([z[i] @ z[k] / temperature for k in others])
        total -= float(torch.log_softmax(logits, 0)[others.index(partner)])
        found += others[int(logits.argmax())] == partner
    return total / 2, found / 2


@pytest.mark.parametrize("b,d,temperature", [(1, 3, 0.5), (5, 7, 0.3), (16, 4, 2.0)])
def test_nt_xent_is_simclr_loss_written_out(b, d, temperature):
    z = torch.randn(2 * b, d, generator=torch.Generator().manual_seed(b))
    loss, correct = nt_xent(z, temperature=temperature)
    want_loss, want_correct = reference_nt_xent(z, temperature)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(correct) == want_correct


def test_nt_xent_rewards_views_that_agree():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    agree = torch.cat([z, z + 0.01 * torch.randn(8, 16, generator=g)])  # the two views nearly equal
    loss_agree, correct = nt_xent(agree, temperature=0.5)
    loss_random, _ = nt_xent(torch.randn(16, 16, generator=g), temperature=0.5)
    assert float(correct) == 8 and float(loss_agree) < float(loss_random)


@pytest.mark.parametrize("channels", [1, 3])
def test_views_are_seeded_in_range_and_differ(channels):
    x = torch.rand(6, channels, 12, 12, generator=torch.Generator().manual_seed(1))
    a = views(x, generator=torch.Generator().manual_seed(5))
    b = views(x, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 6, channels, 12, 12) and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.allclose(a[0], a[1])  # two independent views
    c = views(x, generator=torch.Generator().manual_seed(6))
    assert not torch.allclose(a, c)


def test_views_of_a_constant_image_keep_its_grey_level_without_jitter():
    # A grey image: crops and flips change nothing, brightness scales it, contrast and saturation keep it.
    x = torch.full((200, 3, 8, 8), 0.5)
    v = views(x, generator=torch.Generator().manual_seed(0))
    spread = v.flatten(2).amax(2) - v.flatten(2).amin(2)  # [2, 200]: within-image range
    assert float(spread.max()) < 1e-6
    levels = v[..., 0, 0, 0].flatten()  # 400 views' grey levels
    assert 0.5 * 0.6 - 1e-6 <= float(levels.min()) and float(levels.max()) <= 0.5 * 1.4 + 1e-6
    unchanged = (levels - 0.5).abs() < 1e-6
    assert 0.1 < float(unchanged.float().mean()) < 0.35  # no jitter with probability 1 - 0.8


def test_resized_crops_geometry():
    x = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).view(2, 3, 6, 8)
    one, zero = torch.ones(2), torch.zeros(2)
    keep, mirror = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    same = resized_crops(x, width=one, height=one, cx=zero, cy=zero, mirror=keep)
    assert torch.allclose(same, x, atol=1e-4)  # the whole image, pixel centres on pixel centres
    assert torch.allclose(resized_crops(x, width=one, height=one, cx=zero, cy=zero, mirror=mirror), x.flip(-1),
                          atol=1e-4)
    # The left half (width 1/2 centred at -1/2), stretched to 8 columns: read between columns 0 and 4, rising.
    left = resized_crops(x, width=one / 2, height=one, cx=-one / 2, cy=zero, mirror=keep)
    assert torch.all(left <= x[..., 4:5] - 0.5) and torch.all(left >= x[..., 0:1] - 1e-4)
    assert torch.all(left.diff(dim=-1) > 0)


@pytest.mark.parametrize("flip", [False, True])
def test_views_mirror_only_when_flips_are_allowed(flip):
    # A grey ramp rising to the right: crops, resizing and the colour jitter keep it rising; only a mirror turns it.
    ramp = torch.linspace(0.1, 0.9, 16).expand(300, 3, 16, 16).contiguous()
    v = views(ramp, generator=torch.Generator().manual_seed(0), flip=flip)  # [2, 300, 3, 16, 16]
    slope = (v[..., -1] - v[..., 0]).mean(dim=(2, 3))  # [2, 300]: right minus left
    falling = float((slope < 0).float().mean())
    assert falling == 0 if not flip else 0.4 < falling < 0.6


def test_a_step_is_one_chunk_whatever_the_physical_size():
    data = ImageTensors(torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8,
                                      generator=torch.Generator().manual_seed(0)),
                        torch.zeros(24, dtype=torch.int64), (0.5,) * 3, (0.25,) * 3)
    weights = []
    for physical in (None, 3):  # 3 examples a chunk would split the batch of 12 (and its negatives) in four
        torch.manual_seed(0)
        engine = fast_engine(model=CelebaCNN(in_channels=3, num_classes=PROJECTION_DIM),
                             train_data=data, batch_size=12, optimizer=OptimizerSpec(lr=0.1), dp=None, seed=0,
                             physical_batch_size=physical, objective="contrastive")
        engine.train_epoch()
        weights.append([p.detach().clone() for p in engine.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_engine_options_refuse_dp_bad_temperatures_and_graphs():
    with pytest.raises(ValueError, match="without DP only"):
        FastOptions(objective="contrastive").resolve(torch.device("cpu"), dp=True)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            FastOptions(objective="contrastive", temperature=bad)
    with pytest.raises(ValueError, match="needs the contrastive objective"):
        FastOptions(temperature=0.5)
    settings = FastOptions(objective="contrastive").resolve(torch.device("cuda"), dp=False)
    assert not settings.cuda_graphs and settings.temperature == 0.5  # fresh views every step: eager


def test_a_factory_gets_the_projection_width_also_on_resume(tmp_path):
    seen = []

    def factory(num_classes: int, in_channels: int, image_size: int):
        seen.append(num_classes)
        return CelebaCNN(in_channels=in_channels, num_classes=num_classes)

    train, test = synthetic_split(64, 0), synthetic_split(32, 1)
    run = {**PRETRAIN["run"], "runs_dir": str(tmp_path), "run_name": "f", "max_minutes": 1e-6}
    assert dpvision.fit(factory, train, test, config=PRETRAIN, run=run)["status"] == "paused"
    dpvision.fit(factory, train, test, resume=tmp_path / "python" / "f")
    assert seen == [PROJECTION_DIM, PROJECTION_DIM]  # not the 6 classes
    cross_entropy = {**PRETRAIN, "optim": {"epochs": 1, "batch_size": 64}}
    dpvision.fit(factory, train, test, config=cross_entropy, run={**run, "run_name": "ce", "max_minutes": None})
    assert seen[-1] == 6


@pytest.mark.parametrize("change,field", [
    ({"dp": {"enabled": True}}, "dp.enabled false"),
    ({"run": {"engine": "opacus"}}, "run.engine fast"),
    ({"optim": {"augmult": 2}}, "optim.augmult"),
    ({"optim": {"objective": "triplet"}}, "optim.objective"),
    ({"optim": {"temperature": 0}}, "optim.temperature"),
    ({"optim": {"batch_size": 8193}}, "optim.batch_size"),
    ({"run": {"cache_features": True}}, "run.cache_features true"),
])
def test_refusals_name_the_setting(change, field):
    values = {"dp": {"enabled": False}, "optim": {"objective": "contrastive"}, "model": {"name": "scatternet_linear"}}
    for section, fields in change.items():
        values[section] = {**values.get(section, {}), **fields}
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        TrainConfig.from_dict(values)


def synthetic_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = generate(n, image_size=16, channels=3, seed=seed)
    return data.images, data.labels


def test_pretraining_learns_views_resumes_exactly_and_initialises_a_dp_run(tmp_path):
    train, val, test = synthetic_split(640, 0), synthetic_split(128, 2), synthetic_split(256, 1)
    runs = {"runs_dir": str(tmp_path)}
    summary = dpvision.fit("celeba_cnn", train, test, val, config=PRETRAIN, run={**PRETRAIN["run"], **runs,
                                                                             "run_name": "pre"})
    rows = read_csv(tmp_path / "python" / "pre" / "metrics.csv")
    # The loss falls; pair accuracy among 255 other views of the 128 validation images is 10x chance (1/255)
    # and more, among 511 of the 256 test images too.
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.1
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[-1]["val_accuracy"]) > 10 / 255 and summary["test_accuracy"] > 10 / 511
    assert summary["test_accuracy_per_class"] is None
    assert math.isinf(summary["epsilon"]) and not summary["dp"]
    weights = torch.load(tmp_path / "python" / "pre" / "model.pt", weights_only=True)
    head = [w for name, w in weights.items() if name.endswith("weight")][-1]
    assert head.shape[0] == PROJECTION_DIM

    # A sitting of one epoch (run.max_minutes), then a resume: the same weights and rows as the one call (the
    # views drawn from the checkpointed generator).
    paused = dpvision.fit("celeba_cnn", train, test, val, config=PRETRAIN,
                          run={**PRETRAIN["run"], **runs, "run_name": "parts", "max_minutes": 1e-6})
    assert paused["status"] == "paused" and paused["epoch"] == 1
    dpvision.fit("celeba_cnn", train, test, val, resume=tmp_path / "python" / "parts")
    resumed = torch.load(tmp_path / "python" / "parts" / "model.pt", weights_only=True)
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)
    assert metrics(tmp_path / "python" / "parts") == metrics(tmp_path / "python" / "pre")

    # The pretrained body starts a DP run on the 6 classes, its projection head reset.
    init = str(tmp_path / "python" / "pre" / "model.pt")
    config = TrainConfig.from_dict({"model": {"name": "celeba_cnn", "init": init, "init_head": "reset"},
                                    "dp": {"target_epsilon": 8.0}, "optim": {"epochs": 1, "batch_size": 64, "lr": 0.5},
                                    "run": {**PRETRAIN["run"], **runs, "run_name": "dp"}})
    tuned = dpvision.fit("celeba_cnn", train, test, val, config=config)
    assert tuned["dp"] and tuned["epsilon"] <= 8.0 and len(tuned["test_accuracy_per_class"]) == 6
    config_yaml = (tmp_path / "python" / "dp" / "config.yaml").read_text()
    assert "init_head: reset" in config_yaml
    json.dumps(tuned)  # the summary stays JSON


def test_too_few_steps_advice_keeps_the_batch_of_negatives():
    config = TrainConfig.from_dict({"dp": {"enabled": False}, "optim": {"objective": "contrastive", "epochs": 10,
                                                                         "batch_size": 256}})
    advice = few_steps_advice(config, plan_privacy(config, num_train=630))
    assert "try --batch-size 256 --epochs 67" in advice  # more epochs, not a smaller batch (fewer negatives)

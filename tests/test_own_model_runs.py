"""Your own model trains one DP epoch end to end: torchvision models by name and a user's module, through
``dpvision.fit`` and through the command line (issue 22).

Each run is checked on what it produced, not on having run: the run folder's one metrics row; ε finite and
equal to Opacus's RDP accountant for the plan's σ, q and steps (in the row and in ``summary.json``); the fast
engine itself (no fallback); and the weights, compared with the exact start (the module trained in place,
or the ``model.init`` file the command line started from): every trainable tensor moved, by an update whose
size is what DP-SGD adds. With σ large against C, the update of the flattened parameters [P] over the epoch
is -lr / E[B] times (the clipped sums, norm <= C per example, plus ``steps`` Gaussian draws of std σC), so
its norm / (lr σ C sqrt(P steps) / E[B]) is 1 within a few percent: noise twice per step would give 1.41,
one of the 2 steps without its noise ~0.71, no noise at all ~0.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import dpvision
from dpvision.cli import main
from dpvision.models.external import make_dp_compatible, resolve_model
from tests.conftest import REPO_ROOT
from tests.data_fixtures import write_imagefolder
from tests.job_helpers import exit_code, read_csv, rdp_epsilon, summary, weights, working_dir

SIGMA, LR, CLASSES, SIZE = 4.0, 0.05, 3, 32
SLOW = pytest.mark.slow


class OwnNet(nn.Module):
    """A user's own module: BatchNorm (made GroupNorm by the fix), a depthwise conv, a Linear on tokens
    [B, T, d], LayerNorm and a parameter of its own (a class token)."""

    def __init__(self, num_classes: int = CLASSES, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.token = nn.Parameter(torch.zeros(1, 1, 16))
        self.mix = nn.Linear(16, 16)
        self.ln = nn.LayerNorm(16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = nn.functional.avg_pool2d(torch.relu(self.depthwise(self.stem(x))), 4)  # [B, 16, 4, 4]
        tokens = torch.cat([self.token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)  # [B, 17, 16]
        return self.head(self.ln(torch.relu(self.mix(tokens)))[:, 0])


def own_net(num_classes: int, in_channels: int) -> nn.Module:
    """The factory the command line imports (``--model tests.test_own_model_runs:own_net``)."""
    return OwnNet(num_classes, in_channels)


OWN = "tests.test_own_model_runs:own_net"
# (model name, training examples, expected batch size): ViT-B/16's per-example gradients are 86 M floats each.
CASES = [
    pytest.param("torchvision:resnet18", 16, 8, id="resnet18"),
    pytest.param(OWN, 16, 8, id="own_module"),
    pytest.param("torchvision:mobilenet_v3_small", 16, 8, id="mobilenet_v3_small", marks=SLOW),
    pytest.param("torchvision:efficientnet_b0", 16, 8, id="efficientnet_b0", marks=SLOW),
    pytest.param("torchvision:convnext_tiny", 16, 8, id="convnext_tiny", marks=SLOW),
    pytest.param("torchvision:vit_b_16", 8, 4, id="vit_b_16", marks=SLOW),
]


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == OWN:
        return make_dp_compatible(own_net(CLASSES, 3), "own_net")
    return resolve_model(name, in_channels=3, num_classes=CLASSES, image_size=SIZE)


def random_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return images, torch.arange(n) % CLASSES


def check_run(run_dir, start: dict[str, torch.Tensor], trainable: list[str]) -> None:
    """One DP epoch's outcomes in ``run_dir``, against the weights ``start`` it began from."""
    info = summary(run_dir)
    [row] = read_csv(run_dir / "metrics.csv")
    q, steps = info["sample_rate"], info["steps"]
    assert info["engine"] == "fast" and info["epochs_completed"] == 1 and row["epoch"] == "1"
    assert steps == info["steps_per_epoch"] == int(row["steps"]) >= 2 and info["noise_multiplier"] == SIGMA
    epsilon = rdp_epsilon(SIGMA, q, steps, info["delta"])
    assert math.isfinite(info["epsilon"]) and info["epsilon"] == pytest.approx(epsilon, rel=1e-9)
    assert float(row["epsilon"]) == info["epsilon"] and row["accountant"] == "rdp"
    assert 0 <= info["test_accuracy"] <= 1 and math.isfinite(float(row["train_loss"]))
    end = weights(run_dir)
    assert end.keys() == start.keys()
    unchanged = [k for k in trainable if torch.equal(end[k], start[k])]
    assert not unchanged, f"trainable tensors that did not move: {unchanged}"
    update = torch.cat([(end[k] - start[k]).reshape(-1) for k in trainable])  # [P]
    expected_batch = info["num_train"] // round(1 / q)  # the plan's E[B] (q = 1/m)
    noise_norm = LR * SIGMA * info["max_grad_norm"] * math.sqrt(update.numel() * steps) / expected_batch
    assert 0.9 < float(update.norm()) / noise_norm < 1.1


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize(("name", "n", "batch"), CASES)
def test_fit_trains_one_dp_epoch_of_your_model(name, n, batch, tmp_path):
    model = build(name)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with working_dir(tmp_path):
        info = dpvision.fit(model, random_split(n, 0), random_split(8, 1), optim={"epochs": 1, "batch_size": batch,
                            "lr": LR}, dp={"noise_multiplier": SIGMA}, run={"device": "cpu", "quiet": True})
    run_dir = tmp_path / info["run_dir"]
    check_run(run_dir, start, trainable_names(model))
    saved = weights(run_dir)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())  # trained in place, saved


def train_argv(name: str, root, n: int, batch: int, init, runs) -> list[str]:
    return ["train", "--model", name, "--dataset", "imagefolder", "--data-root", root, "--image-size", SIZE,
            "--k", n, "--batch-size", batch, "--epochs", 1, "--lr", LR, "--sigma", SIGMA, "--device", "cpu",
            "--quiet", "--runs-dir", runs, "--run-name", "r", "--set", f"model.init={init}"]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """3 classes of 32 x 36 RGB images (resized to 32 x 32 by --image-size), 6 per class and split."""
    return write_imagefolder(tmp_path_factory.mktemp("own_images"), ("a", "b", "c"), per_class=6, size=SIZE)


# The quick suite has the command line's resnet18 in tests/test_api.py and the own factory below.
CLI_CASES = [pytest.param(*c.values, id=c.id, marks=SLOW) for c in CASES if c.id != "own_module"]


@pytest.mark.parametrize(("name", "n", "batch"), CLI_CASES)
def test_command_line_trains_one_dp_epoch_of_a_torchvision_model(name, n, batch, image_root, tmp_path, capsys):
    model = build(name)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    argv = train_argv(name, image_root, n, batch, tmp_path / "init.pt", tmp_path / "runs")
    assert exit_code(main, argv) == 0, capsys.readouterr().err
    run_dir = tmp_path / "runs" / "imagefolder" / "r"
    assert summary(run_dir)["model"] == name and summary(run_dir)["num_train"] == n
    check_run(run_dir, model.state_dict(), trainable_names(model))


def test_python_m_dpvision_trains_your_own_factory(image_root, tmp_path):
    """The real command line, in its own process: ``python -m dpvision train --model module:factory``."""
    model = build(OWN)
    torch.save(model.state_dict(), tmp_path / "init.pt")
    argv = [str(a) for a in train_argv(OWN, image_root, 16, 8, tmp_path / "init.pt", tmp_path / "runs")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])}
    done = subprocess.run([sys.executable, "-m", "dpvision", *argv], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "runs" / "imagefolder" / "r"
    assert summary(run_dir)["model"] == OWN
    check_run(run_dir, model.state_dict(), trainable_names(model))

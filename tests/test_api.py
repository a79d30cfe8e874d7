"""``dpvision.fit``: the README's example exactly, the data it accepts, and external models on the command line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

import dpvision
from dpvision.api import fit, make_data
from dpvision.cli import main
from tests.conftest import REPO_ROOT
from tests.job_helpers import exit_code, working_dir

EXAMPLE_MARKER = "<!-- tests/test_api.py runs this example exactly -->"


def readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert EXAMPLE_MARKER in text, "README.md lost the dpvision.fit example"
    block = re.search(r"```python\n(.*?)```", text[text.index(EXAMPLE_MARKER):], re.S)
    return block.group(1)


def test_readme_example_runs_the_job(tmp_path, capsys):
    namespace: dict = {}
    with working_dir(tmp_path):
        exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 (our own README)
    summary, model = namespace["summary"], namespace["model"]
    run_dir = tmp_path / summary["run_dir"]
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.csv", "summary.json", "model.pt",
                                                   "checkpoint.pt"}
    assert json.loads((run_dir / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    assert summary["dataset"] == "python" and summary["model"] == "python:Sequential"
    assert 2.9 < summary["epsilon"] <= 3.0 + 1e-6  # calibrated to the target
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert torch.equal(saved["5.weight"], model[5].weight.detach())  # trained in place
    assert str(summary["test_accuracy"]) in capsys.readouterr().out


class PairDataset(Dataset):
    def __init__(self, images, labels, pil: bool) -> None:
        self.images, self.labels, self.pil = images, labels, pil

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = self.images[i]
        if self.pil:
            return Image.fromarray(image.permute(1, 2, 0).numpy()), int(self.labels[i])
        return image.float() / 255, int(self.labels[i])  # as ToTensor gives it


def test_tensors_floats_and_datasets_give_the_same_data():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 5, 5), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    reference = make_data((images, labels), (images, labels))
    for train in ((images.float() / 255, labels), PairDataset(images, labels, pil=True),
                  PairDataset(images, labels, pil=False)):
        data = make_data(train, (images, labels))
        assert torch.equal(data.train.images, images) and torch.equal(data.train.labels, labels)
        assert data.fingerprint == reference.fingerprint and data.train.mean == reference.train.mean
    assert reference.class_names == ("0", "1", "2") and reference.test.mean == reference.train.mean


@pytest.mark.parametrize(("train", "test", "message"), [
    ((torch.rand(4, 3, 5, 5) * 2, torch.zeros(4, dtype=torch.long)), None, "train: float images must be in [0, 1]"),
    ((torch.zeros(4, 3, 5, 5), torch.zeros(3, dtype=torch.long)), None, "train: images must be [N, C, H, W] with "
                                                                        "labels [N]"),
    ((torch.zeros(4, 3, 5, 5), torch.full((4,), 0.5)), None, "train: labels must be integers >= 0"),
    ((torch.rand(4, 3, 5, 5), torch.arange(4)), (torch.rand(2, 3, 6, 6), torch.arange(2)),
     "test images are [3, 6, 6] but train's are [3, 5, 5]"),
    ("images.npy", None, "train must be (images, labels) tensors, ImageTensors or a map-style Dataset"),
])
def test_bad_data_fails_in_one_line(train, test, message):
    test = test or (torch.rand(2, 3, 5, 5), torch.arange(2))
    with pytest.raises(ValueError) as err:
        make_data(train, test)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_labels_must_fit_the_class_names():
    x = torch.rand(4, 1, 4, 4)
    with pytest.raises(ValueError, match=r"labels must be integers in 0..1 .* got a label 3"):
        make_data((x, torch.tensor([0, 1, 3, 0])), (x, torch.tensor([0, 1, 1, 0])), classes=["cat", "dog"])


def small_net(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 14 * 14, num_classes))


def tiny_split(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=g), torch.randint(0, 3, (n,),
                                                                                               generator=g)


QUICK = {"optim": {"epochs": 1, "batch_size": 8}, "dp": {"noise_multiplier": 1.0},
         "run": {"device": "cpu", "quiet": True}}


def test_a_factory_is_made_dp_compatible_and_a_module_must_already_be(tmp_path):
    train, test = tiny_split(16, 0), tiny_split(8, 1)
    with working_dir(tmp_path):
        summary = fit(small_net, train, test, **QUICK)  # BatchNorm -> GroupNorm, as Opacus's fix
        assert summary["model"] == "python:small_net" and summary["steps"] == 2
        torch.manual_seed(123)  # the factory's weights come from the run's seed, not from the caller's state
        again = fit(small_net, train, test, **QUICK)
        first, second = (torch.load(tmp_path / s["run_dir"] / "model.pt", weights_only=True) for s in (summary, again))
        assert all(torch.equal(first[k], second[k]) for k in first)
        with pytest.raises(ValueError, match=r"^model is not DP-compatible \(.*BatchNorm.*\); fix it first: "
                                             r"model = dpvision.api.make_dp_compatible\(model\)$"):
            fit(small_net(3, 1), train, test, **QUICK)
        with pytest.raises(ValueError, match=r"^fit\(\) got an unexpected keyword 'optimizer'"):
            fit(small_net, train, test, optimizer={"lr": 1})
    assert dpvision.fit is fit


def test_fit_by_name_and_resume_continue_the_same_run(tmp_path):
    train, test = tiny_split(16, 0), tiny_split(8, 1)
    with working_dir(tmp_path):
        first = fit("celeba_cnn", train, test, config={"model": {"width": 8}}, optim={"epochs": 1, "batch_size": 8},
                    dp={"noise_multiplier": 1.0}, run={"device": "cpu", "quiet": True})
        assert first["model"] == "celeba_cnn" and first["steps"] == 2
        with pytest.raises(ValueError, match="does not hold the training data"):
            fit("celeba_cnn", tiny_split(16, 5), test, resume=first["run_dir"])
        again = fit("celeba_cnn", train, test, resume=first["run_dir"], run={"quiet": True})
    assert again["run_dir"] == first["run_dir"] and again["steps"] == 2  # finished: nothing trained again


def test_a_sitting_pauses_and_fit_resume_finishes_it(tmp_path):
    train, test = tiny_split(16, 0), tiny_split(8, 1)
    settings = {"optim": {"epochs": 2, "batch_size": 8}, "dp": {"noise_multiplier": 1.0}}
    with working_dir(tmp_path):
        paused = fit(small_net, train, test, **settings, run={"device": "cpu", "quiet": True, "max_minutes": 1e-6})
        assert (paused["status"], paused["epoch"], paused["epochs"], paused["steps"]) == ("paused", 1, 2, 2)
        done = fit(small_net, train, test, resume=paused["run_dir"], run={"quiet": True})
        whole = fit(small_net, train, test, **settings, run={"device": "cpu", "quiet": True})
        weights = [torch.load(tmp_path / s["run_dir"] / "model.pt", weights_only=True) for s in (done, whole)]
    assert "status" not in done and done["steps"] == whole["steps"] == 4 and done["epsilon"] == whole["epsilon"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])




@pytest.mark.parametrize("name", ["torchvision:resnet18", pytest.param("torchvision:mobilenet_v3_small",
                                                                       marks=pytest.mark.slow)])
def test_command_line_trains_a_torchvision_model(name, tiny_mnist_root, tmp_path, capsys):
    argv = ["train", "--model", name, "--data-root", tiny_mnist_root, "--k", "32", "--batch-size", "16",
            "--epochs", "1", "--device", "cpu", "--quiet", "--runs-dir", tmp_path, "--run-name", "r"]
    assert exit_code(main, argv) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "mnist" / "r" / "summary.json").read_text())
    assert summary["model"] == name and summary["steps"] == 2 and summary["epsilon"] > 0


def test_command_line_refuses_an_unknown_torchvision_model_in_one_line(tiny_mnist_root, tmp_path, capsys):
    argv = ["train", "--model", "torchvision:resnet19", "--data-root", tiny_mnist_root, "--device", "cpu",
            "--runs-dir", tmp_path / "runs"]
    assert exit_code(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert "model.name torchvision:resnet19 is not a torchvision classification model; did you mean" in err
    assert "\n" not in err and not (tmp_path / "runs").exists()

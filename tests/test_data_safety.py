"""Issue 20, the dataset layer: data-independent normalisation, verified caches, constant channels,
non-UTF-8 names and empty class folders.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpvision.cli import main
from dpvision.data import DataError, ImageTensors, NormalizedTensorDataset, load_dataset
from dpvision.data.tensors import NEUTRAL_MEAN, NEUTRAL_STD
from tests.conftest import REPO_ROOT
from tests.data_fixtures import raises_data_error, write_celeba_folder, write_imagefolder
from tests.job_helpers import exit_code, metrics

NEUTRAL = ((NEUTRAL_MEAN,) * 3, (NEUTRAL_STD,) * 3)


# ---------------------------------------------------------------- item 1: normalisation outside ε

def test_imagefolder_normalisation_does_not_depend_on_the_training_images(tmp_path):
    """Two image folders differing in one training image normalise every input identically."""
    a = write_imagefolder(tmp_path / "a", ("x", "y"), 3, 8, seed=4)
    b = write_imagefolder(tmp_path / "b", ("x", "y"), 3, 8, seed=4)
    Image.new("RGB", (8, 12), (255, 255, 255)).save(b / "train" / "y" / "0002.jpg")  # one neighbour differs
    da, db = (load_dataset("imagefolder", root, image_size=8) for root in (a, b))
    assert not torch.equal(da.train.images, db.train.images)
    for split in ("train", "val", "test"):
        pa, pb = getattr(da, split), getattr(db, split)
        assert (pa.mean, pa.std) == (pb.mean, pb.std) == NEUTRAL
    assert torch.equal(da.test.normalize(da.test.images), db.test.normalize(db.test.images))
    assert torch.equal(da.train.normalize(da.train.images[:5]), db.train.normalize(db.train.images[:5]))
    # The Opacus engine's dataset normalises the same way as the fast engine's ImageTensors.normalize.
    x, _ = NormalizedTensorDataset(da.train)[0]
    assert torch.equal(x, da.train.normalize(da.train.images[:1])[0])
    assert float(da.train.normalize(torch.tensor([[[[0]], [[255]], [[51]]]], dtype=torch.uint8)).min()) == -1.0


def test_celeba_loader_ignores_the_statistics_in_stats_json(tmp_path):
    root = write_celeba_folder(tmp_path / "pre", 12, 4, 5)
    before = load_dataset("celeba", root)
    stats = json.loads((root / "stats.json").read_text())
    stats["mean"], stats["std"] = [0.9, 0.1, 0.3], [0.01, 2.0, 0.0]  # edited, even an unusable std of 0
    (root / "stats.json").write_text(json.dumps(stats))
    after = load_dataset("celeba", root)
    for split in ("train", "val", "test"):
        assert (getattr(before, split).mean, getattr(before, split).std) == NEUTRAL
        assert (getattr(after, split).mean, getattr(after, split).std) == NEUTRAL
    assert torch.equal(before.train.normalize(before.train.images), after.train.normalize(after.train.images))


# ---------------------------------------------------------------- item 4: a hand-edited cache

def test_hand_edited_image_cache_is_detected_and_rebuilt(tmp_path):
    write_imagefolder(tmp_path, ("a", "b"), 2, 8)
    first = load_dataset("imagefolder", tmp_path, image_size=8)
    (cache,) = (tmp_path / ".dpvision-cache").iterdir()
    payload = torch.load(cache, weights_only=True)
    payload["train_images"][0].fill_(7)  # pixels overwritten, same key, same shape
    torch.save(payload, cache)
    with pytest.warns(UserWarning, match=f"ignoring image cache {cache}.*do not match"):
        again = load_dataset("imagefolder", tmp_path, image_size=8)
    assert torch.equal(again.train.images, first.train.images)
    (rebuilt,) = (tmp_path / ".dpvision-cache").iterdir()
    assert torch.equal(torch.load(rebuilt, weights_only=True)["train_images"], first.train.images)


# ---------------------------------------------------------------- item 5: a constant channel

def test_image_tensors_refuse_a_zero_or_non_finite_std():
    images, labels = torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1])
    for std in ((0.5, 0.0, 0.5), (0.5, math.inf, 0.5), (0.5, math.nan, 0.5), (0.5, -0.5, 0.5)):
        with pytest.raises(ValueError, match=r"std of channel 1 must be a positive finite number"):
            ImageTensors(images, labels, (0.5,) * 3, std)
    with pytest.raises(ValueError, match=r"mean of channel 2 must be a finite number"):
        ImageTensors(images, labels, (0.5, 0.5, math.nan), (0.5,) * 3)


def test_constant_channel_dataset_trains_without_nan(tmp_path):
    """Every pixel's blue value is 0: the channel's std is 0, which used to give NaN losses and exit 0."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(("a", "b")):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                pixels[..., 2] = 0
                Image.fromarray(pixels, "RGB").save(folder / f"{i}.png")  # PNG: lossless, blue stays 0
    data = load_dataset("imagefolder", tmp_path / "data", image_size=8)
    assert int(data.train.images[:, 2].max()) == 0 and torch.isfinite(data.train.normalize(data.train.images)).all()
    argv = ["train", "--config", REPO_ROOT / "recipes" / "imagefolder.yaml", "--data-root", tmp_path / "data",
            "--image-size", "16", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--quiet",
            "--runs-dir", tmp_path / "runs", "--run-name", "flat"]
    assert exit_code(main, argv) == 0
    (row,) = metrics(tmp_path / "runs" / "imagefolder" / "flat")
    assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["test_loss"]))


# ---------------------------------------------------------------- item 8: names that are not UTF-8

def test_non_utf8_image_file_names_load(tmp_path):
    root = write_imagefolder(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xfe")), ("a", "b"), 2, 8)
    odd = os.path.join(os.fsencode(root / "train" / "b"), b"caf\xe9\xff.jpg")
    Image.new("RGB", (8, 12), (10, 200, 30)).save(os.fsdecode(odd))
    first = load_dataset("imagefolder", root, image_size=8)
    assert len(first.train) == 5 and int(first.train.images[4, 1].min()) > 150  # sorted after 0001.jpg
    assert torch.equal(load_dataset("imagefolder", root, image_size=8).train.images, first.train.images)  # cached


def test_non_utf8_class_folder_is_one_line_naming_it(tmp_path, capsys):
    root = write_imagefolder(tmp_path / "data", ("a", "b"), 2, 8)
    for split in ("train", "val", "test"):
        os.rename(root / split / "b", os.fsdecode(os.path.join(os.fsencode(root / split), b"b\xff")))
    shown = str(root / "train") + "/b\\xff"
    raises_data_error(lambda: load_dataset("imagefolder", root, image_size=8), shown, "not valid UTF-8")
    argv = ["train", "--config", REPO_ROOT / "recipes" / "imagefolder.yaml", "--data-root", root,
            "--image-size", "8", "--device", "cpu", "--quiet", "--runs-dir", tmp_path / "runs"]
    assert exit_code(main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and shown in err and "codec" not in err, err


# ---------------------------------------------------------------- item 9: empty class folders

@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_an_empty_class_folder_is_refused_in_every_split(tmp_path, split):
    root = write_imagefolder(tmp_path, ("a", "b"), 2, 8)
    for path in (root / split / "b").iterdir():
        path.unlink()
    raises_data_error(lambda: load_dataset("imagefolder", root, image_size=8), root / split / "b", "holds no images")

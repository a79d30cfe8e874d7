"""Preprocessing: crop + resize to tensors, train statistics, determinism and bad input."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dpvision.celeba.archive import CelebaDataError
from dpvision.celeba.preprocessing import channel_stats, crop_and_resize, load_split, preprocess
from dpvision.celeba.subset import build_subset
from dpvision.data.tensors import ImageTensors
from tests.celeba_fixtures import demo_archive, run_script  # noqa: F401

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def subset_dir(demo_archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("celeba_subset") / "subset"
    build_subset(demo_archive, out, use_landmarks=True, stratify_by="interocular", total=200, link_mode="copy",
                 progress=False, warn=lambda m: None)
    return out


@pytest.fixture(scope="module")
def pre_dir(subset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("celeba_pre") / "pre"
    preprocess(subset_dir, out, progress=False)
    return out


def index_rows(subset_dir):
    with open(subset_dir / "subset_index.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_split_files_have_the_documented_format(subset_dir, pre_dir):
    assert sorted(p.name for p in pre_dir.iterdir()) == ["stats.json", "test.pt", "train.pt", "val.pt"]
    rows = index_rows(subset_dir)
    for split in SPLITS:
        payload = torch.load(pre_dir / f"{split}.pt", weights_only=True)
        want = [r for r in rows if r["split"] == split]
        assert payload["images"].dtype == torch.uint8 and payload["images"].shape == (len(want), 3, 64, 64)
        assert payload["labels"].dtype == torch.int64 and payload["labels"].tolist() == [int(r["label"]) for r in want]
        assert payload["image_ids"] == [r["image_id"] for r in want]
        assert payload["strata"] == [r["stratum"] for r in want]
        assert payload["class_names"] == ["no_eyeglasses", "eyeglasses"]
    counts = json.loads((pre_dir / "stats.json").read_text())["counts"]
    assert counts == {s: sum(r["split"] == s for r in rows) for s in SPLITS} and counts["train"] == 120  # 60 eyeglasses in train, balanced within IOD bins


def test_pixels_are_centre_crop_then_lanczos(subset_dir, pre_dir):
    rows = [r for r in index_rows(subset_dir) if r["split"] == "val"]
    payload = torch.load(pre_dir / "val.pt", weights_only=True)
    for k in (0, len(rows) - 1):
        with Image.open(subset_dir / rows[k]["dest_path"]) as img:
            want = img.convert("RGB").crop((0, 20, 178, 198)).resize((64, 64), Image.Resampling.LANCZOS)
        assert np.array_equal(payload["images"][k].permute(1, 2, 0).numpy(), np.asarray(want))


def test_stats_match_a_direct_numpy_computation(pre_dir):
    stats = json.loads((pre_dir / "stats.json").read_text())
    images = torch.load(pre_dir / "train.pt", weights_only=True)["images"].numpy().astype(np.float64) / 255.0
    assert stats["mean"] == pytest.approx(images.mean(axis=(0, 2, 3)).tolist(), abs=1e-12)
    assert stats["std"] == pytest.approx(images.std(axis=(0, 2, 3)).tolist(), abs=1e-12)
    assert channel_stats(np.array([[[[0, 255]], [[51, 51]]]], dtype=np.uint8)) == ([0.5, 0.2], [0.5, 0.0])


def test_same_input_same_bytes(subset_dir, pre_dir, tmp_path):
    preprocess(subset_dir, tmp_path / "again", progress=False)
    for name in ("train.pt", "val.pt", "test.pt", "stats.json"):
        assert (tmp_path / "again" / name).read_bytes() == (pre_dir / name).read_bytes(), name


def test_load_split(pre_dir):
    data, meta = load_split(pre_dir, "train")
    stats = json.loads((pre_dir / "stats.json").read_text())
    assert isinstance(data, ImageTensors) and len(data) == 120
    assert data.mean == tuple(stats["mean"]) and data.std == tuple(stats["std"])
    assert meta["class_names"] == ["no_eyeglasses", "eyeglasses"] and len(meta["image_ids"]) == 120
    assert int(data.labels.sum()) == 60  # balanced
    normed = data.normalize(data.images)
    assert normed.mean(dim=(0, 2, 3)).abs().max() < 1e-4  # train statistics centre the train split
    with pytest.raises(CelebaDataError, match="split must be one of train, val, test"):
        load_split(pre_dir, "validation")
    with pytest.raises(CelebaDataError, match="missing .*stats.json"):
        load_split(pre_dir.parent, "train")


def test_other_size_and_crop(subset_dir, tmp_path):
    stats = preprocess(subset_dir, tmp_path / "p", size=32, crop=160, progress=False)
    data, _ = load_split(tmp_path / "p", "test")
    assert data.images.shape[1:] == (3, 32, 32) and stats["size"] == 32 and stats["crop"] == 160
    assert crop_and_resize(Image.new("RGB", (178, 218), (9, 8, 7)), 100, 10)[:, 0, 0].tolist() == [9, 8, 7]


def test_bad_inputs(subset_dir, pre_dir, tmp_path):
    res = run_script("celeba_preprocess.py", "--subset-dir", tmp_path / "none", "--output-dir", tmp_path / "o")
    assert res.returncode == 2 and res.stderr == f"error: --subset-dir {str(tmp_path / 'none')!r} is not a directory\n"
    res = run_script("celeba_preprocess.py", "--subset-dir", subset_dir, "--output-dir", pre_dir)
    assert res.returncode == 2 and "already exists (use --overwrite" in res.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(CelebaDataError, match="missing .*subset_index.csv"):
        preprocess(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(CelebaDataError, match="--crop 300 is larger than the image \\(178x218\\)"):
        preprocess(subset_dir, tmp_path / "o", crop=300, progress=False)
    broken = shutil.copytree(subset_dir, tmp_path / "broken")
    victim = index_rows(broken)[5]
    (broken / victim["dest_path"]).unlink()
    with pytest.raises(CelebaDataError, match=f"image listed in subset_index.csv is missing: .*{victim['image_id']}"):
        preprocess(broken, tmp_path / "o", progress=False)
    (broken / victim["dest_path"]).write_bytes(b"not a jpeg")
    with pytest.raises(CelebaDataError, match=f"cannot read image .*{victim['image_id']}"):
        preprocess(broken, tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty"]  # nothing half-written

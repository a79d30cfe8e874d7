"""Preprocessing: crop + resize to tensors, train statistics, determinism and bad input."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpvision.celeba.archive import CelebaDataError
from dpvision.celeba.cli import preprocess_main
from dpvision.celeba.preprocessing import channel_stats, crop_and_resize, load_split, preprocess
from dpvision.celeba.subset import build_subset
from dpvision.data.tensors import ImageTensors
from tests.celeba_fixtures import demo_archive, run_script, tree_digest  # noqa: F401

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
    assert sorted(p.name for p in pre_dir.iterdir()) == [".dpvision-output", "stats.json", "test.pt", "train.pt", "val.pt"]
    assert json.loads((pre_dir / ".dpvision-output").read_text())["kind"] == "celeba-preprocessed"
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
    assert meta["stats"] == stats and len(stats["mean"]) == 3  # written for people to read ...
    assert data.mean == (0.5,) * 3 and data.std == (0.5,) * 3  # ... never used to normalise (issue 20 item 1)
    assert meta["class_names"] == ["no_eyeglasses", "eyeglasses"] and len(meta["image_ids"]) == 120
    assert int(data.labels.sum()) == 60  # balanced
    normed = data.normalize(data.images)
    assert torch.equal(normed, data.images.float() / 255 * 2 - 1)  # [-1, 1], whatever the images are
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
    assert res.returncode == 2 and "already exists: pass --overwrite to replace it" in res.stderr
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


@pytest.mark.parametrize("where", ["parent", "itself", "child"])
def test_overwrite_never_removes_the_subset_or_what_is_beside_it(subset_dir, tmp_path, capsys, where):
    """Issue 13.8: ``--output-dir <the subset's parent or the subset> --overwrite`` used to delete the subset."""
    subset = Path(shutil.copytree(subset_dir, tmp_path / "data" / "subset"))
    (tmp_path / "data" / "notes.txt").write_text("beside the subset")
    digest = tree_digest(tmp_path / "data")
    out = {"parent": tmp_path / "data", "itself": subset, "child": subset / "pre"}[where]
    code = preprocess_main(["--subset-dir", str(subset), "--output-dir", str(out), "--overwrite", "--no-progress"])
    assert code == 2 and capsys.readouterr().err == (f"error: --output-dir {str(out)!r} overlaps --subset-dir "
                                                     f"{str(subset)!r}; an input, its parents and its sub-folders "
                                                     f"are never written to\n")
    assert tree_digest(tmp_path / "data") == digest


def test_overwrite_replaces_only_a_preprocessed_folder(subset_dir, pre_dir, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    assert preprocess_main(["--subset-dir", str(subset_dir), "--output-dir", str(foreign), "--overwrite"]) == 2
    assert "was not written by dpvision (it has no .dpvision-output marker)" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "years of work"
    other_subset = shutil.copytree(subset_dir, tmp_path / "other_subset", symlinks=True)
    with pytest.raises(CelebaDataError, match=r"holds a celeba-subset \(written by dpvision celeba build-subset\); "
                                              r"--overwrite only replaces a celeba-preprocessed folder"):
        preprocess(subset_dir, other_subset, overwrite=True, progress=False)
    again = shutil.copytree(pre_dir, tmp_path / "again")
    (again / "train.pt").write_bytes(b"stale")
    preprocess(subset_dir, again, overwrite=True, progress=False)
    assert (again / "train.pt").read_bytes() == (pre_dir / "train.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "mine", "other_subset"]


def test_a_fifo_image_is_refused_not_opened(subset_dir, tmp_path):
    broken = shutil.copytree(subset_dir, tmp_path / "broken")
    fifo = broken / index_rows(broken)[3]["dest_path"]
    fifo.unlink()
    os.mkfifo(fifo)
    res = run_script("celeba_preprocess.py", "--subset-dir", broken, "--output-dir", tmp_path / "o", timeout=120)
    assert res.returncode == 2 and res.stderr == f"error: {fifo} is not a regular file (a FIFO); an image must be a file\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows[2].update(dest_path="../../../etc/passwd"),
         r"subset_index.csv:4: dest_path '../../../etc/passwd' must be '<split>/<class_name>/<image_id>'"),
        (lambda rows: rows[2].update(dest_path=f"/{rows[2]['dest_path']}"), r"subset_index.csv:4: dest_path '/train/"),
        (lambda rows: rows[1].update(image_id="../x.jpg"), r"subset_index.csv:3: image id '../x.jpg' is not a plain file name"),
    ],
)
def test_index_paths_must_stay_inside_the_subset(subset_dir, tmp_path, edit, message):
    broken = shutil.copytree(subset_dir, tmp_path / "broken")
    rows = index_rows(broken)
    edit(rows)
    with open(broken / "subset_index.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(CelebaDataError, match=message):
        preprocess(broken, tmp_path / "o", progress=False)


def test_bad_index_and_summary_files(subset_dir, tmp_path):
    broken = shutil.copytree(subset_dir, tmp_path / "broken")
    index = broken / "subset_index.csv"
    index.write_bytes(index.read_bytes().replace(b"eyeglasses", b"eyegl\xe4sses", 1))
    with pytest.raises(CelebaDataError, match=r"subset_index.csv:2: not UTF-8 text \(byte 0xe4\)"):
        preprocess(broken, tmp_path / "o", progress=False)
    shutil.copy(subset_dir / "subset_index.csv", index)
    (broken / "subset_summary.json").write_text("{not json")
    with pytest.raises(CelebaDataError, match=r"subset_summary.json: not valid JSON"):
        preprocess(broken, tmp_path / "o", progress=False)
    (broken / "subset_summary.json").write_text('{"class_names": "oops"}')
    with pytest.raises(CelebaDataError, match=r"subset_summary.json: class_names must be a list of two names"):
        preprocess(broken, tmp_path / "o", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.parametrize("size", [513, 100_000])
def test_size_is_bounded_like_train_image_size(subset_dir, tmp_path, capsys, size):
    """Issue 20 item 11: ``--size 100000`` ended in a MemoryError traceback; now one line, exit 2, nothing written."""
    from dpvision.data import MAX_IMAGE_SIZE

    assert MAX_IMAGE_SIZE == 512
    argv = ["--subset-dir", str(subset_dir), "--output-dir", str(tmp_path / "o"), "--size", str(size),
            "--no-progress"]
    assert preprocess_main(argv) == 2
    assert capsys.readouterr().err == (f"error: --size must be an integer from 1 to 512 (the bound of dpvision train "
                                       f"--image-size), got {size}\n")
    assert list(tmp_path.iterdir()) == []

"""The balanced, stratified subset builder: balance, caps, bins, replacement, outputs and bad input."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dpvision.celeba.archive import CelebaDataError, read_archive
from dpvision.celeba.cli import build_subset_main
from dpvision.celeba.subset import (
    INDEX_FILE, SUMMARY_FILE, allocate, build_subset, caps_from_total, iod_bin_edges,
)  # fmt: skip
from tests.celeba_fixtures import archive_copy, demo_archive, run_script, tree_digest  # noqa: F401

ATTR_CSV = "list_attr_celeba.csv"

SPLITS = ("train", "val", "test")


def read_index(out: Path) -> list[dict[str, str]]:
    with open(out / INDEX_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def build(archive, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("warn", lambda msg: None)
    return build_subset(archive, out, **kw)


def expected_balanced(archive_dir, columns_fn):
    """Per split: sum over strata of min(#pos, #neg), computed directly from the tables."""
    a = read_archive(archive_dir, need_landmarks=True)
    y = a.attribute("Eyeglasses")
    keys = columns_fn(a)
    out = {}
    for code, split in enumerate(SPLITS):
        m = a.partitions == code
        out[split] = sum(min(int(((keys == k) & m & (y == 1)).sum()), int(((keys == k) & m & (y == 0)).sum()))
                         for k in np.unique(keys))
    return out


def test_ratio_policy_and_allocation():
    assert caps_from_total(20000) == {"train": 8000, "val": 1000, "test": 1000}
    assert caps_from_total(25) == {"train": 10, "val": 1, "test": 1}
    assert allocate(10, [10, 5, 5]) == [5, 3, 2]
    assert allocate(7, [1, 1, 100]) == [0, 0, 7]
    assert allocate(50, [3, 4]) == [3, 4]  # never more than a stratum can give
    rng = np.random.default_rng(0)
    for _ in range(200):
        caps = rng.integers(0, 30, size=rng.integers(1, 6)).tolist()
        total = int(rng.integers(0, 100))
        q = allocate(total, caps)
        assert sum(q) == min(total, sum(caps)) and all(0 <= a <= c for a, c in zip(q, caps))


def test_iod_bin_edges_quantile_and_equal_width_fallback():
    assert iod_bin_edges(np.array([30.0, 32.0, 40.0, 48.0]), 2) == ([36.0], "quantile")
    edges, method = iod_bin_edges(np.array([30.0] * 10 + [40.0]), 4)
    assert method == "equal-width" and edges == [32.5, 35.0, 37.5]


def test_stratified_subset_is_exactly_balanced(demo_archive, tmp_path):
    out = tmp_path / "subset"
    summary = build(demo_archive, out, use_landmarks=True, stratify_by="interocular", iod_bins=4)
    rows = read_index(out)
    a = read_archive(demo_archive, need_landmarks=True)
    iod = a.interocular()
    train_iod = iod[a.partitions == 0]
    # bins are the quantiles of the *train* partition only
    assert summary["iod_bin_edges"] == pytest.approx(np.quantile(train_iod, [0.25, 0.5, 0.75]).tolist())
    assert summary["iod_bin_method"] == "quantile"
    per_bin = Counter(np.searchsorted(summary["iod_bin_edges"], train_iod, side="right").tolist())
    assert sorted(per_bin) == [0, 1, 2, 3] and all(abs(n - 80) <= 3 for n in per_bin.values())  # quarters, up to ties
    edges = np.array(summary["iod_bin_edges"])
    want = expected_balanced(demo_archive, lambda arch: np.searchsorted(edges, arch.interocular(), side="right"))
    for split in SPLITS:
        per = Counter((r["class_name"], r["stratum"]) for r in rows if r["split"] == split)
        strata = {s for _, s in per}
        for s in strata:
            assert per[("eyeglasses", s)] == per[("no_eyeglasses", s)], (split, s)
        assert summary["totals"][split]["eyeglasses"] == summary["totals"][split]["no_eyeglasses"] == want[split]
        assert sum(per.values()) == 2 * want[split]
        recorded = summary["counts"][split]["eyeglasses"]
        assert set(strata) <= set(recorded) and recorded == {s: per[("eyeglasses", s)] for s in recorded}
    iod_of = dict(zip(a.image_ids, iod))
    for r in rows:  # the recorded bin is the one the distance falls into; labels match the class folder
        assert int(r["iod_bin"]) == int(np.searchsorted(edges, iod_of[r["image_id"]], side="right"))
        assert float(r["interocular_distance"]) == pytest.approx(iod_of[r["image_id"]], abs=1e-3)
        assert r["stratum"] == f"iod_bin={r['iod_bin']}"
        assert r["dest_path"] == f"{r['split']}/{r['class_name']}/{r['image_id']}"
        assert r["class_name"] == ("eyeglasses" if r["label"] == "1" else "no_eyeglasses")
        assert os.path.islink(out / r["dest_path"])  # default link mode
    assert summary["replacements"]["total"] == 0
    on_disk = json.loads((out / SUMMARY_FILE).read_text())
    assert on_disk["counts"] == summary["counts"] and on_disk["seed"] == 1337
    assert sorted(on_disk["source_checksums"]) == ["list_attr_celeba.csv", "list_bbox_celeba.csv", "list_eval_partition.csv",
                                                   "list_landmarks_align_celeba.csv"]


def test_caps_total_policy_and_warning(demo_archive, tmp_path):
    s = build(demo_archive, tmp_path / "a", total=100, dry_run=True)
    assert s["caps"] == {"train": 40, "val": 5, "test": 5}
    assert {k: v["total"] for k, v in s["totals"].items()} == {"train": 80, "val": 10, "test": 10}
    s = build(demo_archive, tmp_path / "b", total=100, max_per_class_val=3, dry_run=True)  # explicit cap wins
    assert s["totals"]["val"] == {"no_eyeglasses": 3, "eyeglasses": 3, "total": 6}
    assert s["cap_source"] == {"train": "--total", "val": "--max-per-class-val", "test": "--total"}
    warnings = []
    s = build(demo_archive, tmp_path / "c", max_per_class_train=8000, dry_run=True, warn=warnings.append)
    avail = s["available"]["train"]
    assert len(warnings) == 1 and s["warnings"] == warnings
    assert warnings[0] == (f"--max-per-class-train asks for 8000 per class but train has "
                           f"eyeglasses={avail['eyeglasses']}, no_eyeglasses={avail['no_eyeglasses']}; "
                           f"using {avail['eyeglasses']} per class")
    assert s["totals"]["train"]["eyeglasses"] == avail["eyeglasses"]


def test_stratified_cap_is_allocated_proportionally(demo_archive, tmp_path):
    s = build(demo_archive, tmp_path / "a", use_landmarks=True, stratify_by=["interocular"], max_per_class_train=30,
              dry_run=True)
    per = s["counts"]["train"]
    assert per["eyeglasses"] == per["no_eyeglasses"] and sum(per["eyeglasses"].values()) == 30
    assert not (tmp_path / "a").exists()


def test_stratify_by_attribute_equalises_its_distribution(demo_archive, tmp_path):
    out = tmp_path / "subset"
    s = build(demo_archive, out, use_landmarks=True, stratify_by=["interocular,Male"], iod_bins=2)
    assert s["stratify_columns"] == ["iod_bin", "Male"]
    rows = read_index(out)
    for split in SPLITS:
        for var in ("Male", "iod_bin"):
            pos = Counter(r[var] for r in rows if r["split"] == split and r["label"] == "1")
            neg = Counter(r[var] for r in rows if r["split"] == split and r["label"] == "0")
            assert pos == neg, (split, var)
    assert {r["stratum"] for r in rows} <= {f"iod_bin={b}|Male={m}" for b in (0, 1) for m in (0, 1)}


def test_same_seed_same_subset_other_seed_differs(demo_archive, tmp_path):
    kw = dict(use_landmarks=True, stratify_by="interocular", total=200)
    s1 = build(demo_archive, tmp_path / "a", **kw)
    s2 = build(demo_archive, tmp_path / "b", **kw)
    build(demo_archive, tmp_path / "c", seed=7, **kw)
    assert (tmp_path / "a" / INDEX_FILE).read_bytes() == (tmp_path / "b" / INDEX_FILE).read_bytes()
    s1["arguments"].pop("output_dir"), s2["arguments"].pop("output_dir")
    assert s1 == s2
    ids = lambda d: {r["image_id"] for r in read_index(tmp_path / d)}  # noqa: E731
    assert ids("a") != ids("c")


def test_missing_and_corrupt_images_are_replaced(archive_copy, tmp_path):
    kw = dict(use_landmarks=True, stratify_by="interocular", total=200)
    first = read_index_after(build, archive_copy, tmp_path / "first", **kw)
    train_rows = [r for r in first if r["split"] == "train" and r["label"] == "0"]  # the majority class has spares
    gone, broken = train_rows[0], train_rows[-1]
    image_dir = archive_copy / "img_align_celeba" / "img_align_celeba"
    (image_dir / gone["image_id"]).unlink()
    data = (image_dir / broken["image_id"]).read_bytes()
    (image_dir / broken["image_id"]).write_bytes(data[: len(data) // 2])  # truncated JPEG
    s = build(archive_copy, tmp_path / "second", **kw)
    second = read_index(tmp_path / "second")
    assert s["replacements"]["total"] == 2 and s["replacements"]["by_split"] == {"train": 2, "val": 0, "test": 0}
    reasons = {r["image_id"]: r["reason"] for r in s["replacements"]["images"]}
    assert reasons[gone["image_id"]] == "missing" and reasons[broken["image_id"]].startswith("unreadable")
    before, after = {r["image_id"] for r in first}, {r["image_id"] for r in second}
    assert before - after == {gone["image_id"], broken["image_id"]} and len(after - before) == 2
    by_id = {r["image_id"]: r for r in second}
    for rep in s["replacements"]["images"]:  # same split, class and stratum as the image it replaces
        old = gone if rep["image_id"] == gone["image_id"] else broken
        new = by_id[rep["replaced_by"]]
        assert (new["split"], new["label"], new["stratum"]) == (old["split"], old["label"], old["stratum"])
    assert s["counts"] == json.loads((tmp_path / "first" / SUMMARY_FILE).read_text())["counts"]

    assert s["dropped"] == []

    bad = f"({gone['image_id']} is missing|{broken['image_id']} is unreadable: .*) \\(--strict-missing\\)"
    with pytest.raises(CelebaDataError, match=bad):
        build(archive_copy, tmp_path / "strict", strict_missing=True, **kw)
    assert not (tmp_path / "strict").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers
    res = run_script("celeba_build_subset.py", "--archive-dir", archive_copy, "--output-dir", tmp_path / "strict2",
                     "--use-landmarks", "--stratify-by", "interocular", "--total", "200", "--strict-missing")
    last = res.stderr.splitlines()[-1]
    assert res.returncode == 2 and last.startswith("error: image ") and last.endswith("(--strict-missing)")


def read_index_after(fn, *args, **kw):
    fn(*args, **kw)
    return read_index(args[1])


@pytest.mark.parametrize("mode", ["copy", "symlink", "hardlink"])
def test_link_modes(demo_archive, tmp_path, mode):
    out = tmp_path / "subset"
    build(demo_archive, out, total=40, link_mode=mode)
    rows = read_index(out)
    assert len(rows) == 2 * (16 + 2 + 2)  # --total 40: 16, 2, 2 per class
    for r in rows:
        dest, src = out / r["dest_path"], Path(r["source_path"])
        assert dest.read_bytes() == src.read_bytes()
        assert dest.is_symlink() == (mode == "symlink")
        if mode == "hardlink":
            assert dest.stat().st_ino == src.stat().st_ino
        if mode == "copy":
            assert dest.stat().st_ino != src.stat().st_ino


def test_dry_run_writes_nothing_and_existing_output_is_refused(demo_archive, tmp_path, capsys):
    digest = tree_digest(demo_archive)
    res = run_script("celeba_build_subset.py", "--archive-dir", demo_archive, "--output-dir", tmp_path / "x",
                     "--total", "100", "--dry-run")
    assert res.returncode == 0 and "dry run: nothing written" in res.stdout and "train: 80 images" in res.stdout
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    res = run_script("celeba_build_subset.py", "--archive-dir", demo_archive, "--output-dir", out, "--total", "100")
    assert res.returncode == 2 and res.stderr == (f"error: --output-dir {str(out)!r} already exists: pass --overwrite "
                                                  f"to replace it, or choose another --output-dir\n")
    assert (out / "keep.txt").read_text() == "old"
    # --overwrite only ever replaces a folder dpvision wrote: not this one
    code = build_subset_main(["--archive-dir", str(demo_archive), "--output-dir", str(out), "--total", "100",
                              "--overwrite"])
    assert code == 2 and capsys.readouterr().err == (
        f"error: --output-dir {str(out)!r} was not written by dpvision (it has no .dpvision-output marker); "
        f"--overwrite only replaces a celeba-subset folder, so remove it yourself or choose another --output-dir\n")
    assert (out / "keep.txt").read_text() == "old"
    (out / "keep.txt").unlink()  # an empty folder holds nothing to lose: used as it is
    build(demo_archive, out, total=100)
    assert json.loads((out / ".dpvision-output").read_text())["kind"] == "celeba-subset"
    first = (out / INDEX_FILE).read_bytes()
    build(demo_archive, out, total=40, overwrite=True)  # a subset replaces a subset
    assert len(read_index(out)) == 40 and (out / INDEX_FILE).read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert tree_digest(demo_archive) == digest  # the archive is never modified


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attribute", "Glasses"], "error: unknown attribute 'Glasses'; valid attributes: 5_o_Clock_Shadow, "),
        (["--stratify-by", "interocular"], "error: --stratify-by interocular needs --use-landmarks"),
        (["--stratify-by", "Eyeglasses"], "error: --stratify-by cannot include the target attribute Eyeglasses"),
        (["--use-landmarks", "--stratify-by", "Smile"], "error: unknown attribute 'Smile'"),
        (["--max-per-class-train", "-1"], "error: --max-per-class-train must be >= 0"),
    ],
)
def test_bad_flags_exit_2(demo_archive, tmp_path, capsys, args, message):
    code = build_subset_main(["--archive-dir", str(demo_archive), "--output-dir", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_unknown_attribute_via_script(demo_archive, tmp_path):
    res = run_script("celeba_build_subset.py", "--archive-dir", demo_archive, "--output-dir", tmp_path / "o",
                     "--attribute", "Glasses")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: unknown attribute 'Glasses'; valid attributes: 5_o_Clock_Shadow, ")
    assert res.stderr.rstrip().endswith("Wearing_Necktie, Young") and "Eyeglasses" in res.stderr


def test_bad_archive_exit_2(archive_copy, tmp_path, capsys):
    (archive_copy / "list_landmarks_align_celeba.csv").unlink()
    code = build_subset_main(["--archive-dir", str(archive_copy), "--output-dir", str(tmp_path / "o"), "--use-landmarks"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --use-landmarks needs") and "list_landmarks_align_celeba.csv" in err
    lines = (archive_copy / "list_attr_celeba.csv").read_text().splitlines()
    lines[9] = lines[9].rsplit(",", 1)[0]  # one field short on line 10
    (archive_copy / "list_attr_celeba.csv").write_text("\n".join(lines) + "\n")
    res = run_script("celeba_build_subset.py", "--archive-dir", archive_copy, "--output-dir", tmp_path / "o")
    assert res.returncode == 2
    assert res.stderr == f"error: {archive_copy / 'list_attr_celeba.csv'}:10: expected 41 fields, got 40\n"
    code = build_subset_main(["--archive-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and capsys.readouterr().err == f"error: --archive-dir {str(tmp_path / 'nowhere')!r} is not a directory\n"
    (archive_copy / "list_eval_partition.csv").unlink()
    code = build_subset_main(["--archive-dir", str(archive_copy), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "missing annotation file" in capsys.readouterr().err
    with pytest.raises(CelebaDataError, match="overlaps --archive-dir"):
        build(archive_copy, archive_copy / "subset")
    assert not (tmp_path / "o").exists()


def test_iod_filters(demo_archive, tmp_path):
    s = build(demo_archive, tmp_path / "o", use_landmarks=True, min_iod=30, max_iod=45)
    rows = read_index(tmp_path / "o")
    assert rows and all(30 <= float(r["interocular_distance"]) <= 45 for r in rows)
    a = read_archive(demo_archive, need_landmarks=True)
    iod, y = a.interocular(), a.attribute("Eyeglasses")
    keep = (iod >= 30) & (iod <= 45) & (a.partitions == 0)
    assert s["totals"]["train"]["eyeglasses"] == min(int((keep & (y == 1)).sum()), int((keep & (y == 0)).sum()))
    with pytest.raises(CelebaDataError, match="--min-iod/--max-iod need --use-landmarks"):
        build(demo_archive, tmp_path / "p", min_iod=30)


def test_bad_image_without_spare_drops_its_partner(archive_copy, tmp_path):
    first = read_index_after(build, archive_copy, tmp_path / "first", total=400)  # every positive is used
    pos = next(r for r in first if r["split"] == "val" and r["label"] == "1")
    (archive_copy / "img_align_celeba" / "img_align_celeba" / pos["image_id"]).unlink()
    warnings = []
    s = build(archive_copy, tmp_path / "second", total=400, warn=warnings.append)
    before = json.loads((tmp_path / "first" / SUMMARY_FILE).read_text())["totals"]["val"]
    assert s["totals"]["val"] == {"no_eyeglasses": before["eyeglasses"] - 1, "eyeglasses": before["eyeglasses"] - 1,
                                  "total": 2 * before["eyeglasses"] - 2}
    assert [d["reason"] for d in s["dropped"]] == ["missing", "balance"]
    assert "dropped 2 image(s)" in warnings[-1]
    assert len(read_index(tmp_path / "second")) == s["total"] == sum(b["total"] for b in
                                                                    json.loads((tmp_path / "first" / SUMMARY_FILE).read_text())["totals"].values()) - 2


def test_image_id_with_a_path_cannot_write_outside_the_output(archive_copy, tmp_path):
    """Issue 13.7: a row naming ``../../../victim.txt`` must not make ``--link-mode copy`` write outside the output."""
    a = read_archive(archive_copy)
    row = int(np.flatnonzero((a.partitions == 0) & (a.attribute("Eyeglasses") == 1))[0])  # chosen: minority class
    good, evil = a.image_ids[row], "../../../victim.txt"
    for table in archive_copy.glob("list_*.csv"):
        table.write_text(table.read_text().replace(f"\n{good},", f"\n{evil},"))
    image_dir = archive_copy / "img_align_celeba" / "img_align_celeba"
    (image_dir / good).rename(image_dir / evil)  # the "image" behind the id: <tmp_path>/victim.txt
    victim = tmp_path / "outs" / "victim.txt"  # where the copy would land: beside --output-dir
    victim.parent.mkdir()
    victim.write_text("precious")
    res = run_script("celeba_build_subset.py", "--archive-dir", archive_copy, "--output-dir", tmp_path / "outs" / "subset",
                     "--link-mode", "copy", "--no-progress")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith(f"error: {archive_copy / ATTR_CSV}:{row + 2}: image id {evil!r} is not a plain file name")
    assert victim.read_text() == "precious" and sorted(p.name for p in victim.parent.iterdir()) == ["victim.txt"]


def test_header_only_tables_exit_2(archive_copy, tmp_path, capsys):
    for table in archive_copy.glob("list_*.csv"):
        table.write_text(table.read_text().splitlines()[0] + "\n")
    code = build_subset_main(["--archive-dir", str(archive_copy), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {archive_copy / ATTR_CSV}: no image rows, only a header\n"
    assert not (tmp_path / "o").exists()


def test_a_fifo_image_is_refused_not_opened(archive_copy, tmp_path):
    """A FIFO where an image should be would block the first ``open`` forever: it is refused from its ``stat``."""
    a = read_archive(archive_copy)
    row = int(np.flatnonzero((a.partitions == 1) & (a.attribute("Eyeglasses") == 1))[0])
    fifo = a.image_path(a.image_ids[row])
    fifo.unlink()
    os.mkfifo(fifo)
    res = run_script("celeba_build_subset.py", "--archive-dir", archive_copy, "--output-dir", tmp_path / "o",
                     "--no-progress", timeout=120)
    assert res.returncode == 2 and res.stderr == f"error: {fifo} is not a regular file (a FIFO); an image must be a file\n"
    assert not (tmp_path / "o").exists()


def test_overlapping_output_is_refused_even_with_overwrite(archive_copy, tmp_path):
    digest = tree_digest(archive_copy)
    for out in (archive_copy, tmp_path, archive_copy / "img_align_celeba"):
        with pytest.raises(CelebaDataError, match=f"--output-dir {str(out)!r} overlaps --archive-dir"):
            build(archive_copy, out, overwrite=True)
    assert tree_digest(archive_copy) == digest


def test_no_default_output_name_claims_a_size(demo_archive, tmp_path, capsys):
    """Issue 14: nothing names the output after a size ("20k") it may not have: --output-dir is required."""
    with pytest.raises(SystemExit):
        build_subset_main(["--archive-dir", str(demo_archive), "--total", "100"])
    assert "the following arguments are required: --output-dir" in capsys.readouterr().err
    with pytest.raises(CelebaDataError, match="--output-dir is required"):
        build(demo_archive, None)

"""Reading CelebA archives (CSV and TXT layouts) and the demo-archive generator."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image
from tests.celeba_fixtures import (  # noqa: F401 (fixtures)
    DEMO_N, archive_copy, cached_archive, demo_archive, tree_digest, txt_archive_copy,
)

from dpvision.celeba.archive import (
    ATTRIBUTE_NAMES, LANDMARK_COLUMNS, CelebaDataError, class_names, interocular_distance, read_archive,
    validate_attribute,
)  # fmt: skip
from dpvision.celeba.demo import IOD_RANGE, make_demo_archive, render_face

KAGGLE_FILES = ["list_attr_celeba.csv", "list_bbox_celeba.csv", "list_eval_partition.csv",
                "list_landmarks_align_celeba.csv"]


def test_attribute_names_are_celebas_forty():
    assert len(ATTRIBUTE_NAMES) == 40 and len(set(ATTRIBUTE_NAMES)) == 40
    assert ATTRIBUTE_NAMES[0] == "5_o_Clock_Shadow" and ATTRIBUTE_NAMES[15] == "Eyeglasses"
    assert ATTRIBUTE_NAMES[20] == "Male" and ATTRIBUTE_NAMES[-1] == "Young"
    assert validate_attribute("eyeglasses") == "Eyeglasses"
    assert class_names("Eyeglasses") == ["no_eyeglasses", "eyeglasses"]
    assert class_names("Wearing_Hat") == ["no_wearing_hat", "wearing_hat"]


def test_demo_archive_has_kaggle_layout(demo_archive):
    assert sorted(p.name for p in demo_archive.iterdir()) == sorted(KAGGLE_FILES + [".dpvision-output", "img_align_celeba"])
    images = sorted((demo_archive / "img_align_celeba" / "img_align_celeba").iterdir())
    assert len(images) == DEMO_N and images[0].name == "000001.jpg" and images[-1].name == f"{DEMO_N:06d}.jpg"
    with Image.open(images[0]) as img:
        assert img.format == "JPEG" and img.size == (178, 218)
    lines = (demo_archive / "list_attr_celeba.csv").read_text().splitlines()
    assert lines[0] == "image_id," + ",".join(ATTRIBUTE_NAMES) and len(lines) == DEMO_N + 1
    assert (demo_archive / "list_landmarks_align_celeba.csv").read_text().splitlines()[0] == \
        "image_id," + ",".join(LANDMARK_COLUMNS)
    assert (demo_archive / "list_eval_partition.csv").read_text().startswith("image_id,partition\n000001.jpg,")
    assert (demo_archive / "list_bbox_celeba.csv").read_text().startswith("image_id,x_1,y_1,width,height\n")


def test_read_csv_archive(demo_archive):
    archive = read_archive(demo_archive, need_landmarks=True, need_bbox=True)
    assert len(archive) == DEMO_N and archive.image_ids[:2] == ["000001.jpg", "000002.jpg"]
    assert archive.image_dir == demo_archive / "img_align_celeba" / "img_align_celeba"
    assert archive.attributes.shape == (DEMO_N, 40) and set(np.unique(archive.attributes)) == {-1, 1}
    assert np.bincount(archive.partitions).tolist() == [320, 40, 40]  # exact 80/10/10
    assert archive.landmarks.shape == (DEMO_N, 10) and archive.bbox.shape == (DEMO_N, 4)
    assert sorted(archive.checksums) == KAGGLE_FILES and all(len(v) == 64 for v in archive.checksums.values())
    iod = archive.interocular()
    assert IOD_RANGE[0] - 1 <= iod.min() and iod.max() <= IOD_RANGE[1] + 1
    rate = archive.attribute("Eyeglasses").mean()
    assert 0.12 < rate < 0.28  # documented ~20%
    # attributes that must agree with each other
    male, beard = archive.attribute("Male"), 1 - archive.attribute("No_Beard")
    assert not np.any(beard & (1 - male))


def test_interocular_distance():
    lm = np.array([[69, 111, 108, 111, 0, 0, 0, 0, 0, 0], [0, 0, 3, 4, 0, 0, 0, 0, 0, 0]])
    assert interocular_distance(lm).tolist() == [39.0, 5.0]


def test_txt_layout_reads_the_same_as_csv(tmp_path_factory, demo_archive):
    txt = cached_archive(tmp_path_factory, fmt="txt", nested=False)
    assert (txt / "list_attr_celeba.txt").read_text().splitlines()[0] == str(DEMO_N)
    assert (txt / "list_eval_partition.txt").read_text().splitlines()[0].split() == ["000001.jpg", "0"]
    a, b = read_archive(demo_archive, need_landmarks=True), read_archive(txt, need_landmarks=True, need_bbox=True)
    assert b.image_dir == txt / "img_align_celeba"
    assert a.image_ids == b.image_ids
    for field in ("attributes", "partitions", "landmarks"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert (a.image_dir / "000007.jpg").read_bytes() == (b.image_dir / "000007.jpg").read_bytes()


def test_original_release_subfolders(tmp_path_factory, tmp_path):
    src = cached_archive(tmp_path_factory, fmt="txt", nested=False)
    root = tmp_path / "celeba"
    (root / "Anno").mkdir(parents=True)
    (root / "Eval").mkdir()
    shutil.copytree(src / "img_align_celeba", root / "Img" / "img_align_celeba")
    for name in ("list_attr_celeba.txt", "list_landmarks_align_celeba.txt", "list_bbox_celeba.txt"):
        shutil.copy(src / name, root / "Anno" / name)
    shutil.copy(src / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt")
    archive = read_archive(root, need_landmarks=True)
    assert len(archive) == DEMO_N and archive.image_dir == root / "Img" / "img_align_celeba"


def test_generator_is_deterministic_and_independent_of_workers(tmp_path):
    n = 520  # above the parallel threshold
    make_demo_archive(tmp_path / "a", n, seed=3, workers=2)
    make_demo_archive(tmp_path / "b", n, seed=3, workers=1)
    make_demo_archive(tmp_path / "c", 30, seed=4, workers=1)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    first = "img_align_celeba/img_align_celeba/000001.jpg"
    assert (tmp_path / "a" / first).read_bytes() != (tmp_path / "c" / first).read_bytes()
    with pytest.raises(CelebaDataError, match="--overwrite"):
        make_demo_archive(tmp_path / "a", 10, seed=3)


def test_eyeglasses_are_drawn_at_the_eye_landmarks():
    import io

    checked = 0
    for index in range(12):
        with_g, _, lm, _ = render_face(index, 0, force={"Eyeglasses": 1, "Blurry": -1})
        without, _, lm2, _ = render_face(index, 0, force={"Eyeglasses": -1, "Blurry": -1})
        assert lm == lm2  # the face is the same, only the glasses differ
        a = np.asarray(Image.open(io.BytesIO(with_g)), dtype=np.int32)
        b = np.asarray(Image.open(io.BytesIO(without)), dtype=np.int32)
        changed = np.abs(a - b).sum(axis=2) > 60
        left, right = np.array(lm[0:2], float), np.array(lm[2:4], float)
        iod = np.linalg.norm(right - left)
        yy, xx = np.mgrid[0:a.shape[0], 0:a.shape[1]]
        for eye in (left, right):
            dist = np.hypot(xx - eye[0], yy - eye[1])
            ring = (dist > 0.12 * iod) & (dist < 0.4 * iod)
            assert changed[ring].mean() > 0.08, (index, changed[ring].mean())
        # almost every changed pixel lies in the band of the eye line
        mid = (left + right) / 2
        axis = (right - left) / iod
        along = (xx - mid[0]) * axis[0] + (yy - mid[1]) * axis[1]
        across = -(xx - mid[0]) * axis[1] + (yy - mid[1]) * axis[0]
        band = (np.abs(along) < 1.35 * iod) & (np.abs(across) < 0.45 * iod)
        assert changed.sum() > 0 and changed[band].sum() / changed.sum() > 0.97, index
        checked += 1
    assert checked == 12


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: (r / "list_attr_celeba.csv").unlink(), "missing annotation file: .*list_attr_celeba.csv"),
        (lambda r: (r / "list_eval_partition.csv").unlink(), "list_eval_partition.csv"),
        (lambda r: shutil.rmtree(r / "img_align_celeba"), "image folder not found"),
        (lambda r: _replace_line(r / "list_attr_celeba.csv", 5, "000004.jpg,1,-1"),
         r"list_attr_celeba.csv:5: expected 41 fields, got 3"),
        (lambda r: _replace_line(r / "list_attr_celeba.csv", 7, "000006.jpg" + ",2" * 40),
         r"list_attr_celeba.csv:7: bad value '2'"),
        (lambda r: _replace_line(r / "list_eval_partition.csv", 3, "000002.jpg,7"),
         r"list_eval_partition.csv:3: bad value '7'"),
        (lambda r: _replace_line(r / "list_landmarks_align_celeba.csv", 4, "000003.jpg,1,2,3,4,5,6,7,8,9,x"),
         r"list_landmarks_align_celeba.csv:4: bad value 'x'"),
        (lambda r: _replace_line(r / "list_eval_partition.csv", 3, "999999.jpg,0"),
         r"list_eval_partition.csv:3: image '999999.jpg' is not in list_attr_celeba"),
        (lambda r: (r / "list_landmarks_align_celeba.csv").unlink(), "--use-landmarks needs .*list_landmarks"),
        # header-only tables
        (lambda r: _keep_lines(r / "list_attr_celeba.csv", 1), r"list_attr_celeba.csv: no image rows, only a header$"),
        (lambda r: _keep_lines(r / "list_eval_partition.csv", 1), r"list_eval_partition.csv: no image rows, only a header$"),
        (lambda r: _keep_lines(r / "list_landmarks_align_celeba.csv", 1),
         r"list_landmarks_align_celeba.csv: no image rows, only a header$"),
        (lambda r: (r / "list_attr_celeba.csv").write_bytes(b""), r"list_attr_celeba.csv: empty file, expected a header line"),
        # not UTF-8 (Latin-1 e-acute on line 3)
        (lambda r: _replace_line_bytes(r / "list_eval_partition.csv", 3, b"00000\xe9.jpg,0"),
         r"list_eval_partition.csv:3: not UTF-8 text \(byte 0xe9\); save the file as UTF-8$"),
        (lambda r: _replace_line_bytes(r / "list_attr_celeba.csv", 1, b"image_id,\xff" + b",x" * 39),
         r"list_attr_celeba.csv:1: not UTF-8 text \(byte 0xff\)"),
        # a duplicated image id: the first row must not be silently overridden by the last
        (lambda r: _append_line(r / "list_eval_partition.csv", "000001.jpg,2"),
         rf"list_eval_partition.csv:{DEMO_N + 2}: image '000001.jpg' appears twice \(first on line 2\)$"),
        (lambda r: _append_line(r / "list_landmarks_align_celeba.csv", "000003.jpg" + ",1" * 10),
         rf"list_landmarks_align_celeba.csv:{DEMO_N + 2}: image '000003.jpg' appears twice \(first on line 4\)$"),
        (lambda r: _append_line(r / "list_attr_celeba.csv", "000002.jpg" + ",1" * 40),
         rf"list_attr_celeba.csv:{DEMO_N + 2}: image '000002.jpg' appears twice \(first on line 3\)$"),
    ],
)
def test_bad_archives_raise_clear_errors(archive_copy, edit, message):
    edit(archive_copy)
    with pytest.raises(CelebaDataError, match=message):
        read_archive(archive_copy, need_landmarks=True)


def test_unknown_attribute_lists_the_valid_ones():
    with pytest.raises(CelebaDataError, match="unknown attribute 'Glasses'; valid attributes: 5_o_Clock_Shadow,.*Young"):
        validate_attribute("Glasses")


@pytest.mark.parametrize("bad", ["../../../victim.txt", "a/b.jpg", "/etc/passwd", "..", ".", "x\\y.jpg",
                                 "nul\x00.jpg", "", "bell\x07.jpg"])
def test_image_ids_must_be_plain_file_names(archive_copy, bad):
    """Image ids become file names under the output folder: a path in one must never get that far."""
    _rename_image(archive_copy, "000004.jpg", bad)
    with pytest.raises(CelebaDataError) as info:
        read_archive(archive_copy)
    message = str(info.value)
    assert message.startswith(f"{archive_copy / 'list_attr_celeba.csv'}:5: image id {bad!r} is not a plain file name")
    assert "\n" not in message


def test_txt_tables_header_only_and_not_utf8(txt_archive_copy):
    attr = txt_archive_copy / "list_attr_celeba.txt"
    original = attr.read_bytes()
    header = original.splitlines()[1]
    attr.write_bytes(b"0\n" + header + b"\n")
    with pytest.raises(CelebaDataError, match=r"list_attr_celeba.txt: no image rows, only a header$"):
        read_archive(txt_archive_copy)
    attr.write_bytes(original)
    part = txt_archive_copy / "list_eval_partition.txt"
    part.write_bytes(b"000001.jpg 0\n000002.jpg \xa00\n")
    with pytest.raises(CelebaDataError, match=r"list_eval_partition.txt:2: not UTF-8 text \(byte 0xa0\)"):
        read_archive(txt_archive_copy)
    part.write_bytes(b"")
    with pytest.raises(CelebaDataError, match=r"list_eval_partition.txt: empty file, expected one row per image$"):
        read_archive(txt_archive_copy)


def test_a_table_that_is_a_fifo_is_refused_without_opening_it(archive_copy):
    part = archive_copy / "list_eval_partition.csv"
    part.unlink()
    os.mkfifo(part)  # opening it for reading would block forever
    with pytest.raises(CelebaDataError, match=rf"^{part} is not a regular file \(a FIFO\)"):
        read_archive(archive_copy)


def test_oversized_table_is_refused_before_reading(archive_copy, monkeypatch):
    import dpvision.celeba.archive as archive_module

    monkeypatch.setattr(archive_module, "MAX_TABLE_BYTES", 1000)
    with pytest.raises(CelebaDataError, match=r"list_attr_celeba.csv is larger than 1000 bytes"):
        read_archive(archive_copy)


def test_empty_nested_image_folder_does_not_hide_the_images(archive_copy):
    outer = archive_copy / "img_align_celeba"
    for image in sorted((outer / "img_align_celeba").iterdir()):  # flat layout + an empty Kaggle-style folder
        image.rename(outer / image.name)
    assert list((outer / "img_align_celeba").iterdir()) == []
    assert read_archive(archive_copy).image_dir == outer
    (outer / ".DS_Store").write_text("x")  # stray files do not make a folder hold the images
    shutil.copy(outer / "000009.jpg", outer / "img_align_celeba" / "000009.jpg")
    with pytest.raises(CelebaDataError, match=rf"images are in both {outer / 'img_align_celeba'}/ and {outer}/"):
        read_archive(archive_copy)


def test_stray_files_beside_the_nested_folder_are_ignored(archive_copy):
    outer = archive_copy / "img_align_celeba"
    (outer / "README.txt").write_text("downloaded from kaggle")
    assert read_archive(archive_copy).image_dir == outer / "img_align_celeba"
    shutil.rmtree(outer / "img_align_celeba")
    (outer / "img_align_celeba").mkdir()
    with pytest.raises(CelebaDataError, match=r"none of the images listed in .*list_attr_celeba.csv \(e.g. 000001.jpg\)"):
        read_archive(archive_copy)


def _rename_image(root, old, new):
    """Rename image ``old`` to ``new`` in every table of a CSV archive."""
    for table in root.glob("list_*.csv"):
        table.write_text(table.read_text().replace(f"\n{old},", f"\n{new},"))


def _keep_lines(path, n):
    path.write_text("\n".join(path.read_text().splitlines()[:n]) + "\n")


def _append_line(path, text):
    path.write_text(path.read_text() + text + "\n")


def _replace_line_bytes(path, lineno, data):
    lines = path.read_bytes().splitlines()
    lines[lineno - 1] = data
    path.write_bytes(b"\n".join(lines) + b"\n")


def _replace_line(path, lineno, text):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")

"""The dataset layer: every dataset's on-disk format, caching, fingerprints, and every corrupt input."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dpvision.data.imagefolder as imagefolder
import dpvision.data.mnist as mnist_data
from dpvision.data import (
    DATASETS, MAX_IMAGE_SIZE, DataError, DataNotFoundError, DatasetSplits, ImageTensors, channel_stats,
    data_fingerprint, dataset_root_hint, load_dataset,
)  # fmt: skip
from dpvision.data.mnist import RAW_FILES, load_mnist
from tests.conftest import REAL_MNIST_SKIP, real_mnist_files
from tests.data_fixtures import (
    CIFAR10_CLASSES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, cifar_batch_bytes, idx_bytes, raises_data_error,
    write_celeba_folder, write_cifar10, write_idx_mnist, write_imagefolder,
)  # fmt: skip

IDX_DATASETS = [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]


@contextmanager
def no_hang(seconds: int = 20):
    """Fail instead of blocking forever (opening a FIFO for reading blocks until a writer comes)."""
    def alarm(signum, frame):
        raise TimeoutError("blocked: a FIFO was opened")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def listing(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def idx_arrays(raw: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """What the fixture wrote, read back with numpy only."""
    def read(name):
        path = raw / name
        data = gzip.decompress(path.with_name(name + ".gz").read_bytes()) if not path.exists() else path.read_bytes()
        return data
    images, labels = read(f"{prefix}-images-idx3-ubyte"), read(f"{prefix}-labels-idx1-ubyte")
    return np.frombuffer(images[16:], np.uint8).reshape(-1, 1, 28, 28), np.frombuffer(labels[8:], np.uint8)


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)

@pytest.mark.parametrize("name,folder", IDX_DATASETS)
@pytest.mark.parametrize("gz", [True, False])
def test_idx_datasets_load_what_was_written(tmp_path, name, folder, gz):
    raw = write_idx_mnist(tmp_path, 30, 12, folder=folder, gz=gz, seed=3)
    splits = load_dataset(name, tmp_path, download=False)
    for part, prefix, n in ((splits.train, "train", 30), (splits.test, "t10k", 12)):
        images, labels = idx_arrays(raw, prefix)
        assert part.images.shape == (n, 1, 28, 28) and part.images.dtype == torch.uint8
        assert np.array_equal(part.images.numpy(), images) and part.labels.tolist() == labels.tolist()
        assert part.labels.dtype == torch.int64
    assert splits.val is None and splits.test_groups is None and len(splits.class_names) == 10
    assert splits.train.mean == ((0.1307,) if name == "mnist" else (0.2860,))
    assert splits.train.std == ((0.3081,) if name == "mnist" else (0.3530,))
    assert splits.class_names[0] == ("0" if name == "mnist" else "T-shirt/top")


@pytest.mark.parametrize("name,folder", IDX_DATASETS)
def test_read_only_root_of_gz_files_is_read_in_place(tmp_path, name, folder):
    raw = write_idx_mnist(tmp_path, 20, 10, folder=folder, gz=True)
    before = listing(tmp_path)
    for path in (raw, raw.parent, tmp_path):
        path.chmod(0o555)
    try:
        splits = load_dataset(name, tmp_path, download=False)
    finally:
        for path in (tmp_path, raw.parent, raw):
            path.chmod(0o755)
    assert len(splits.train) == 20 and listing(tmp_path) == before  # nothing unpacked next to the .gz


def test_real_mnist_from_its_read_only_shared_folder(tmp_path):
    """The shared real MNIST (.gz only, read-only): read in place, byte-identical to torchvision's reader."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    files = real_mnist_files()
    if files is None:
        pytest.skip(REAL_MNIST_SKIP)
    source = files[RAW_FILES[2]].parent
    (tmp_path / "root" / "MNIST").mkdir(parents=True)
    (tmp_path / "root" / "MNIST" / "raw").symlink_to(source, target_is_directory=True)
    before = listing(source)
    test = load_mnist(tmp_path / "root", train=False, download=False)
    assert listing(source) == before and test.images.shape == (10_000, 1, 28, 28)
    for name in RAW_FILES[2:]:
        data = files[name].read_bytes()
        (tmp_path / name).write_bytes(gzip.decompress(data) if files[name].suffix == ".gz" else data)
    assert torch.equal(test.images, read_image_file(str(tmp_path / RAW_FILES[2])).unsqueeze(1))
    assert torch.equal(test.labels, read_label_file(str(tmp_path / RAW_FILES[3])).long())


def _corrupt_idx(raw: Path, case: str) -> Path:
    """Break one file of a written (uncompressed) IDX folder; return the file to be named."""
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    img = images.read_bytes()
    edits = {
        "truncated images": (images, img[:-100]),
        "truncated header": (images, img[:10]),
        "magic only": (labels, labels.read_bytes()[:4]),
        "empty images": (images, b""),
        "empty labels": (labels, b""),
        "bad magic": (images, struct.pack(">I", 2052) + img[4:]),
        "swapped magic": (images, struct.pack(">I", IDX_LABELS_MAGIC) + img[4:]),
        "bad label magic": (labels, struct.pack(">I", IDX_IMAGES_MAGIC) + labels.read_bytes()[4:]),
        "not 28x28": (images, idx_bytes(IDX_IMAGES_MAGIC, (40, 28, 21), img[16:])),
        "count too large": (images, idx_bytes(IDX_IMAGES_MAGIC, (41, 28, 28), img[16:])),
        "count too small": (images, idx_bytes(IDX_IMAGES_MAGIC, (39, 28, 28), img[16:])),
        "zero images": (images, idx_bytes(IDX_IMAGES_MAGIC, (0, 28, 28), b"")),
        "absurd count": (images, idx_bytes(IDX_IMAGES_MAGIC, (2**32 - 1, 28, 28), img[16:])),
        "label 10": (labels, idx_bytes(IDX_LABELS_MAGIC, (40,), bytes([1] * 39 + [10]))),
        "label 255": (labels, idx_bytes(IDX_LABELS_MAGIC, (40,), bytes([255] * 40))),
        "fewer labels than images": (images, idx_bytes(IDX_LABELS_MAGIC, (39,), bytes(39))),
    }
    path, data = edits[case]
    if case == "fewer labels than images":
        labels.write_bytes(data)
        return images  # the message names both files
    path.write_bytes(data)
    return path


IDX_CASES = ["truncated images", "truncated header", "magic only", "empty images", "empty labels", "bad magic",
             "swapped magic", "bad label magic", "not 28x28", "count too large", "count too small", "zero images", "absurd count",
             "label 10", "label 255", "fewer labels than images"]


@pytest.mark.parametrize("name,folder", IDX_DATASETS)
@pytest.mark.parametrize("case", IDX_CASES)
def test_corrupt_idx_file_is_a_one_line_error_naming_it(tmp_path, name, folder, case):
    raw = write_idx_mnist(tmp_path, 40, 10, folder=folder, gz=False)
    bad = _corrupt_idx(raw, case)
    err = raises_data_error(lambda: load_dataset(name, tmp_path, download=False), bad)
    assert ("is empty" in str(err)) == case.startswith("empty")


@pytest.mark.parametrize("name,folder", IDX_DATASETS)
@pytest.mark.parametrize("case", ["truncated gzip", "not gzip", "gzip of truncated idx", "bad crc"])
def test_corrupt_gz_file_is_a_one_line_error_naming_it(tmp_path, name, folder, case):
    raw = write_idx_mnist(tmp_path, 40, 10, folder=folder, gz=True)
    path = raw / "t10k-images-idx3-ubyte.gz"
    packed = path.read_bytes()
    data = {"truncated gzip": packed[: len(packed) // 2], "not gzip": b"this is not gzip" * 10,
            "gzip of truncated idx": gzip.compress(gzip.decompress(packed)[:-5]),
            "bad crc": packed[:-8] + bytes(4) + packed[-4:]}[case]
    path.write_bytes(data)
    raises_data_error(lambda: load_dataset(name, tmp_path, download=False), path)


def test_fifo_in_place_of_an_idx_file_is_refused_without_blocking(tmp_path):
    raw = write_idx_mnist(tmp_path, 10, 10, gz=False)
    fifo = raw / "train-labels-idx1-ubyte"
    fifo.unlink()
    os.mkfifo(fifo)
    with no_hang():
        raises_data_error(lambda: load_dataset("mnist", tmp_path, download=False), fifo, "FIFO")


@pytest.mark.parametrize("name,folder", IDX_DATASETS)
def test_missing_idx_offline_says_where_files_go(tmp_path, monkeypatch, name, folder):
    def offline(root):
        raise OSError("network unreachable")
    monkeypatch.setattr(mnist_data, "_download" if name == "mnist" else "_download_fashion_mnist", offline)
    err = raises_data_error(lambda: load_dataset(name, tmp_path), tmp_path / folder / "raw",
                            "train-images-idx3-ubyte.gz", "download failed: network unreachable")
    assert isinstance(err, DataNotFoundError) and isinstance(err, FileNotFoundError)
    raises_data_error(lambda: load_dataset(name, tmp_path, download=False), "download disabled")


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    """torchvision makes <root>/MNIST/raw before it downloads: offline, the folders it made go again,
    a folder that existed before stays, and one that now holds a file is never removed."""
    def offline(root):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise OSError("network unreachable")
    monkeypatch.setattr(mnist_data, "_download", offline)
    root = tmp_path / "new" / "data"
    (tmp_path / "new").mkdir()
    raises_data_error(lambda: load_dataset("mnist", root), "download failed")
    assert not root.exists() and (tmp_path / "new").is_dir()

    def partial(root):
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"")
        raise OSError("connection reset")
    monkeypatch.setattr(mnist_data, "_download", partial)
    raises_data_error(lambda: load_dataset("mnist", root), "download failed: connection reset")
    assert (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists()


def test_a_partial_download_is_completed_with_either_form(tmp_path):
    raw = write_idx_mnist(tmp_path, 10, 10, gz=True)
    (raw / "t10k-labels-idx1-ubyte.gz").rename(raw / "x")
    raises_data_error(lambda: load_dataset("mnist", tmp_path, download=False), raw)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress((raw / "x").read_bytes()))  # unpacked counts too
    assert len(load_dataset("mnist", tmp_path, download=False).test) == 10


# ---------------------------------------------------------------- CIFAR-10

def test_cifar10_loads_batches_in_order_with_channel_planes(tmp_path):
    folder = write_cifar10(tmp_path, 23, 7, seed=1)
    splits = load_dataset("cifar10", tmp_path, download=False)
    batches = [pickle.loads((folder / f"data_batch_{i}").read_bytes()) for i in range(1, 6)]
    want = np.concatenate([b[b"data"] for b in batches])  # [23, 3072]
    assert splits.train.images.shape == (23, 3, 32, 32) and splits.test.images.shape == (7, 3, 32, 32)
    assert np.array_equal(splits.train.images.numpy().reshape(23, -1), want)
    assert np.array_equal(splits.train.images[5, 1].numpy(), want[5, 1024:2048].reshape(32, 32))  # green plane
    assert splits.train.labels.tolist() == sum((b[b"labels"] for b in batches), [])
    assert splits.class_names == CIFAR10_CLASSES and splits.val is None
    assert splits.train.mean == (0.4914, 0.4822, 0.4465) and splits.train.std == (0.2470, 0.2435, 0.2616)


def _py2_string(b: bytes) -> bytes:
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def py2_batch_bytes(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as Python 2's cPickle wrote CIFAR-10: str keys, numpy.core array, data as a binary string."""
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_string(b"b") + b"\x87R"
             + b"(K\x01M" + struct.pack("<H", data.shape[0]) + b"M" + struct.pack("<H", data.shape[1]) + b"\x86"
             + b"cnumpy\ndtype\n" + _py2_string(b"u1") + b"K\x00K\x01\x87R(K\x03" + _py2_string(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + _py2_string(data.tobytes()) + b"tb")
    return (b"\x80\x02}(" + _py2_string(b"data") + array + _py2_string(b"labels") + b"]("
            + b"".join(b"K" + bytes([y]) for y in labels) + b"eu.")


def test_cifar10_reads_python2_pickles(tmp_path):
    folder = write_cifar10(tmp_path, 10, 4)
    data = np.arange(3 * 3072).astype(np.uint8).reshape(3, 3072)
    (folder / "test_batch").write_bytes(py2_batch_bytes(data, [9, 0, 4]))
    test = load_dataset("cifar10", tmp_path, download=False).test
    assert test.labels.tolist() == [9, 0, 4] and np.array_equal(test.images.numpy().reshape(3, -1), data)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _cifar_case(folder: Path, case: str) -> Path:
    good = np.zeros((4, 3072), np.uint8)
    batch = folder / "data_batch_2"
    cases = {
        "truncated": (batch, batch.read_bytes()[:-50]),
        "garbage": (batch, b"\x00garbage" * 20),
        "empty": (batch, b""),
        "not a dict": (batch, pickle.dumps([1, 2, 3], protocol=2)),
        "no labels": (batch, pickle.dumps({b"data": good}, protocol=2)),
        "short rows": (batch, pickle.dumps({b"data": np.zeros((4, 3071), np.uint8), b"labels": [0] * 4}, protocol=2)),
        "float data": (batch, pickle.dumps({b"data": np.zeros((4, 3072)), b"labels": [0] * 4}, protocol=2)),
        "label count": (batch, pickle.dumps({b"data": good, b"labels": [0] * 3}, protocol=2)),
        "label 10": (batch, cifar_batch_bytes(good, [0, 1, 2, 10])),
        "negative label": (batch, cifar_batch_bytes(good, [0, 1, 2, -1])),
        "meta without names": (folder / "batches.meta", pickle.dumps({b"num_vis": 3072}, protocol=2)),
        "meta garbage": (folder / "batches.meta", b"\x80\x02garbage"),
        "exploit": (batch, pickle.dumps({b"data": _Exploit(folder / "pwned"), b"labels": []}, protocol=2)),
    }
    path, data = cases[case]
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", ["truncated", "garbage", "empty", "not a dict", "no labels", "short rows",
                                  "float data", "label count", "label 10", "negative label", "meta without names",
                                  "meta garbage", "exploit"])
def test_corrupt_cifar_file_is_a_one_line_error_naming_it(tmp_path, case):
    folder = write_cifar10(tmp_path, 20, 5)
    bad = _cifar_case(folder, case)
    raises_data_error(lambda: load_dataset("cifar10", tmp_path, download=False), bad)
    assert not (folder / "pwned").exists()  # the pickle's code never ran


def test_cifar10_missing_files_and_fifo(tmp_path, monkeypatch):
    import dpvision.data.cifar as cifar

    monkeypatch.setattr(cifar, "_download_cifar10", lambda root: (_ for _ in ()).throw(OSError("offline")))
    raises_data_error(lambda: load_dataset("cifar10", tmp_path), tmp_path / "cifar-10-batches-py", "data_batch_1",
                      "batches.meta", "download failed: offline")
    folder = write_cifar10(tmp_path, 10, 4)
    (folder / "test_batch").unlink()
    os.mkfifo(folder / "test_batch")
    with no_hang():
        raises_data_error(lambda: load_dataset("cifar10", tmp_path, download=False), folder / "test_batch", "FIFO")


# ---------------------------------------------------------------- image folders

def test_imagefolder_shapes_labels_classes_and_fixed_normalisation(tmp_path):
    write_imagefolder(tmp_path, ("dog", "cat", "bird"), 3, 12, seed=2)
    splits = load_dataset("imagefolder", tmp_path, image_size=10)
    assert splits.class_names == ("bird", "cat", "dog")  # sorted, label = position
    for part in (splits.train, splits.val, splits.test):
        assert part.images.shape == (9, 3, 10, 10) and part.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert (part.mean, part.std) == ((0.5,) * 3, (0.5,) * 3) != channel_stats(splits.train.images)
    img = Image.open(tmp_path / "train" / "cat" / "0001.jpg").convert("RGB")  # 12 x 16: crop rows 2..13
    want = img.crop((0, 2, 12, 14)).resize((10, 10), Image.Resampling.LANCZOS)
    assert np.array_equal(splits.train.images[4].permute(1, 2, 0).numpy(), np.asarray(want))
    assert load_dataset("imagefolder", tmp_path).train.images.shape[-1] == 64  # the default size


def test_imagefolder_without_val_grayscale_png_and_nested_folders(tmp_path):
    write_imagefolder(tmp_path, ("a", "b"), 2, 8, splits=("train", "test"), ext="png", mode="L")
    nested = tmp_path / "train" / "b" / "more" / "deeper"
    nested.mkdir(parents=True)
    Image.new("L", (8, 8), 200).save(nested / "x.PNG")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "a" / ".hidden.png").write_bytes(b"junk")  # dotfiles are skipped
    splits = load_dataset("imagefolder", tmp_path, image_size=8)
    assert splits.val is None and splits.train.labels.tolist() == [0, 0, 1, 1, 1]
    assert splits.train.images.shape == (5, 3, 8, 8)
    assert torch.equal(splits.train.images[:, 0], splits.train.images[:, 2])  # gray: equal channels
    assert int(splits.train.images[4].min()) == 200


def test_imagefolder_follows_symlinks_and_refuses_loops(tmp_path):
    source = write_imagefolder(tmp_path / "src", ("a", "b"), 2, 8)
    root = tmp_path / "root"
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            for image in sorted((source / split / name).iterdir()):
                (root / split / name / image.name).symlink_to(image)
    (root / "train" / "b" / "more").symlink_to(source / "test" / "b", target_is_directory=True)  # a linked folder
    splits = load_dataset("imagefolder", root, image_size=8)
    direct = load_dataset("imagefolder", source, image_size=8)
    assert torch.equal(splits.test.images, direct.test.images) and splits.train.labels.tolist() == [0, 0, 1, 1, 1, 1]
    assert torch.equal(splits.train.images[4:], direct.test.images[2:])
    (root / "train" / "a" / "loop").symlink_to(root / "train", target_is_directory=True)
    with no_hang():
        raises_data_error(lambda: load_dataset("imagefolder", root, image_size=8), root / "train" / "a" / "loop",
                          "symlink loop")


def test_imagefolder_cache_is_hit_then_invalidated_by_a_changed_image(tmp_path, monkeypatch):
    write_imagefolder(tmp_path, ("a", "b"), 3, 8)
    first = load_dataset("imagefolder", tmp_path, image_size=8)
    cache = list((tmp_path / ".dpvision-cache").iterdir())
    assert len(cache) == 1 and cache[0].suffix == ".pt"
    calls = []
    real = imagefolder.decode_image
    monkeypatch.setattr(imagefolder, "decode_image", lambda path, size: calls.append(path) or real(path, size))
    second = load_dataset("imagefolder", tmp_path, image_size=8)
    assert calls == [] and data_fingerprint(second.train) == data_fingerprint(first.train)
    assert torch.equal(second.test.images, first.test.images)
    Image.new("RGB", (8, 12), (255, 0, 0)).save(tmp_path / "train" / "b" / "0001.jpg")
    third = load_dataset("imagefolder", tmp_path, image_size=8)
    assert len(calls) == 18 and data_fingerprint(third.train) != data_fingerprint(first.train)
    assert data_fingerprint(third.test) == data_fingerprint(first.test)
    assert [p.name for p in (tmp_path / ".dpvision-cache").iterdir()] != [cache[0].name]  # old one replaced
    assert len(list((tmp_path / ".dpvision-cache").iterdir())) == 1


def test_imagefolder_garbled_cache_is_rebuilt(tmp_path):
    write_imagefolder(tmp_path, ("a", "b"), 2, 8)
    first = load_dataset("imagefolder", tmp_path, image_size=8)
    (cache,) = (tmp_path / ".dpvision-cache").iterdir()
    cache.write_bytes(cache.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ignoring unreadable image cache"):
        again = load_dataset("imagefolder", tmp_path, image_size=8)
    assert torch.equal(again.train.images, first.train.images)
    assert load_dataset("imagefolder", tmp_path, image_size=8).train.images.shape == (4, 3, 8, 8)


def test_imagefolder_unwritable_root_caches_in_xdg_cache_home(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "data", ("a", "b"), 2, 8)
    (root / ".dpvision-cache").write_text("a file where the cache folder would go")  # mkdir fails, even as root
    root.chmod(0o555)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    try:
        before = listing(root)
        first = load_dataset("imagefolder", root, image_size=8)
        assert listing(root) == before
    finally:
        root.chmod(0o755)
    (cache,) = (tmp_path / "xdg" / "dpvision").iterdir()
    assert cache.name.startswith("imagefolder-") and cache.suffix == ".pt"
    monkeypatch.setattr(imagefolder, "decode_image", lambda path, size: pytest.fail("cache missed"))
    assert torch.equal(load_dataset("imagefolder", root, image_size=8).val.images, first.val.images)


def test_imagefolder_without_any_writable_cache_still_loads(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "data", ("a", "b"), 1, 8)
    (root / ".dpvision-cache").write_text("not a folder")
    (tmp_path / "xdg").write_text("not a folder either")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with pytest.warns(UserWarning, match="could not write an image cache"):
        splits = load_dataset("imagefolder", root, image_size=8)
    assert len(splits.train) == 2 and not list(tmp_path.rglob("*.tmp"))


def _break_imagefolder(root: Path, case: str) -> object:
    """Damage a written image folder; return what the error must name."""
    image = root / "train" / "b" / "0000.jpg"
    if case == "garbage image":
        image.write_bytes(b"not a jpeg at all")
    elif case == "truncated image":
        image.write_bytes(image.read_bytes()[:60])
    elif case == "fifo image":
        image.unlink()
        os.mkfifo(image)
    elif case == "broken symlink":
        image.unlink()
        image.symlink_to(root / "nowhere.jpg")
    elif case == "no test split":
        for path in sorted((root / "test").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (root / "test").rmdir()
        return root / "test"
    elif case == "class mismatch":
        (root / "val" / "b").rename(root / "val" / "c")
        return root / "val"
    elif case == "empty train class":
        for path in (root / "train" / "a").iterdir():
            path.unlink()
        return root / "train" / "a"
    elif case == "one class":
        for split in ("train", "val", "test"):
            for path in (root / split / "b").iterdir():
                path.unlink()
            (root / split / "b").rmdir()
        return root / "train"
    elif case == "split is a file":
        for path in (root / "val").rglob("*.jpg"):
            path.unlink()
        for path in (root / "val").iterdir():
            path.rmdir()
        (root / "val").rmdir()
        (root / "val").write_text("x")
        return root / "val"
    return image


@pytest.mark.parametrize("case", ["garbage image", "truncated image", "fifo image", "broken symlink", "no test split",
                                  "class mismatch", "empty train class", "one class", "split is a file"])
def test_bad_imagefolder_is_a_one_line_error_naming_the_path(tmp_path, case):
    write_imagefolder(tmp_path, ("a", "b"), 2, 8)
    needle = _break_imagefolder(tmp_path, case)
    with no_hang():
        raises_data_error(lambda: load_dataset("imagefolder", tmp_path, image_size=8), needle)
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("size", [0, -3, MAX_IMAGE_SIZE + 1, 10**9, True, 8.5])
def test_image_size_out_of_bounds_is_refused(tmp_path, size):
    write_imagefolder(tmp_path, ("a", "b"), 1, 8)
    raises_data_error(lambda: load_dataset("imagefolder", tmp_path, image_size=size), "--image-size",
                      MAX_IMAGE_SIZE)
    assert not (tmp_path / ".dpvision-cache").exists()


def test_dataset_larger_than_memory_bound_is_refused_before_decoding(tmp_path, monkeypatch):
    write_imagefolder(tmp_path, ("a", "b"), 2, 8)
    monkeypatch.setenv("DPVISION_MAX_DATA_BYTES", str(12 * 3 * 64 * 64 - 1))  # 12 images at 64x64 do not fit
    monkeypatch.setattr(imagefolder, "decode_image", lambda path, size: pytest.fail("decoded"))
    raises_data_error(lambda: load_dataset("imagefolder", tmp_path, image_size=64), "--image-size", tmp_path)
    write_idx_mnist(tmp_path / "m", 20, 5, gz=True)
    monkeypatch.setenv("DPVISION_MAX_DATA_BYTES", str(19 * 784))
    raises_data_error(lambda: load_dataset("mnist", tmp_path / "m", download=False), "train-images-idx3-ubyte.gz")


# ---------------------------------------------------------------- preprocessed CelebA

@pytest.fixture(scope="module")
def celeba_dirs(tmp_path_factory):
    """The real pipeline on the demo archive: a symlinked subset folder and its preprocessed 16x16 folder."""
    from dpvision.celeba.preprocessing import preprocess
    from dpvision.celeba.subset import build_subset
    from tests.celeba_fixtures import cached_archive

    archive = cached_archive(tmp_path_factory)
    out = tmp_path_factory.mktemp("celeba_data")
    build_subset(archive, out / "subset", use_landmarks=True, stratify_by="interocular", total=200,
                 link_mode="symlink", progress=False, warn=lambda m: None)
    preprocess(out / "subset", out / "pre", size=16, progress=False)
    return out / "subset", out / "pre"


def test_celeba_folder_from_the_real_preprocessing(celeba_dirs):
    _, pre = celeba_dirs
    splits = load_dataset("celeba", pre, download=False)
    stats = json.loads((pre / "stats.json").read_text())
    for split in ("train", "val", "test"):
        payload = torch.load(pre / f"{split}.pt", weights_only=True)
        part = getattr(splits, split)
        assert torch.equal(part.images, payload["images"]) and torch.equal(part.labels, payload["labels"])
        assert part.mean == part.std == (0.5,) * 3 != tuple(stats["mean"]) and part.images.shape[1:] == (3, 16, 16)
    assert splits.test_groups == tuple(torch.load(pre / "test.pt", weights_only=True)["strata"])
    assert len(set(splits.test_groups)) > 1 and splits.val_groups is not None
    assert splits.class_names == ("no_eyeglasses", "eyeglasses")
    raises_data_error(lambda: load_dataset("celeba", pre, image_size=64), "--image-size 64", "--size 64")


def test_celeba_subset_folder_of_symlinks_is_an_imagefolder(celeba_dirs):
    subset, _ = celeba_dirs
    assert any(p.is_symlink() for p in (subset / "train" / "eyeglasses").iterdir())
    splits = load_dataset("imagefolder", subset, image_size=16)
    summary = json.loads((subset / "subset_summary.json").read_text())
    assert splits.class_names == ("eyeglasses", "no_eyeglasses")
    assert len(splits.train) == summary["totals"]["train"]["total"] and splits.val is not None


def test_celeba_counts_come_from_the_tensors_not_stats_json(tmp_path):
    root = write_celeba_folder(tmp_path / "pre", 48, 6, 10)
    stats = json.loads((root / "stats.json").read_text())
    stats["counts"]["train"] = 100000
    (root / "stats.json").write_text(json.dumps(stats))
    with pytest.warns(UserWarning, match="stats.json: counts .* differ from the tensors"):
        splits = load_dataset("celeba", root)
    assert len(splits.train) == 48 and len(splits.val) == 6 and len(splits.test_groups) == 10


def test_celeba_empty_val_is_none(tmp_path):
    splits = load_dataset("celeba", write_celeba_folder(tmp_path / "pre", 12, 0, 5))
    assert splits.val is None and splits.val_groups is None and len(splits.test) == 5


def _celeba_case(root: Path, case: str) -> Path:
    train, test, stats = root / "train.pt", root / "test.pt", root / "stats.json"

    def edit(path, **changes):
        payload = torch.load(path, weights_only=True)
        payload.update(changes)
        torch.save(payload, path)
        return path
    if case == "truncated train.pt":
        train.write_bytes(train.read_bytes()[:-200])
    elif case == "garbage test.pt":
        test.write_bytes(b"\x00" * 64)
    elif case == "empty test.pt":
        test.write_bytes(b"")
    elif case == "stats.json not json":
        stats.write_text('{"mean": [0.5, 0.5,')
    elif case == "stats.json not an object":
        stats.write_text(json.dumps([0.5, 0.5, 0.5]))
    elif case == "missing val.pt":
        (root / "val.pt").unlink()
        return root / "val.pt"
    elif case == "float images":
        return edit(train, images=torch.zeros(12, 3, 8, 8))
    elif case == "3-D images":
        return edit(test, images=torch.zeros(5, 8, 8, dtype=torch.uint8))
    elif case == "label count":
        return edit(train, labels=torch.zeros(11, dtype=torch.int64))
    elif case == "label range":
        return edit(test, labels=torch.full((5,), 2))
    elif case == "class names differ":
        return edit(test, class_names=["no_hat", "hat"])
    elif case == "strata length":
        return edit(test, strata=["a"] * 4)
    elif case == "image size differs":
        return edit(test, images=torch.zeros(5, 3, 9, 9, dtype=torch.uint8))
    elif case == "stats class names":
        data = json.loads(stats.read_text())
        data["class_names"] = ["x", "y"]
        stats.write_text(json.dumps(data))
    elif case == "pickled code":
        buffer = io.BytesIO()
        torch.save({"images": _Exploit(root / "pwned")}, buffer)
        train.write_bytes(buffer.getvalue())
    return {"truncated train.pt": train, "stats.json not json": stats, "stats.json not an object": stats,
            "stats class names": stats, "pickled code": train}.get(case, test)


CELEBA_CASES = ["truncated train.pt", "garbage test.pt", "empty test.pt", "stats.json not json",
                "stats.json not an object", "missing val.pt", "float images", "3-D images", "label count",
                "label range", "class names differ", "strata length", "image size differs", "stats class names",
                "pickled code"]


@pytest.mark.parametrize("case", CELEBA_CASES)
def test_corrupt_celeba_folder_is_a_one_line_error_naming_the_file(tmp_path, case):
    root = write_celeba_folder(tmp_path / "pre", 12, 4, 5)
    bad = _celeba_case(root, case)
    raises_data_error(lambda: load_dataset("celeba", root), bad)
    assert not (root / "pwned").exists()


def test_celeba_root_must_be_a_preprocessed_folder(tmp_path):
    raises_data_error(lambda: load_dataset("celeba", tmp_path / "missing"), tmp_path / "missing", "celeba_preprocess")
    raises_data_error(lambda: load_dataset("celeba", tmp_path), "train.pt", "stats.json")


# ---------------------------------------------------------------- registry, fingerprints

def test_fingerprint_identifies_exactly_what_is_trained_on(tmp_path):
    write_idx_mnist(tmp_path / "a", 20, 5, gz=True, seed=1)
    write_idx_mnist(tmp_path / "b", 20, 5, gz=False, seed=1)
    a, b = (load_dataset("mnist", tmp_path / r, download=False).train for r in "ab")
    assert data_fingerprint(a) == data_fingerprint(b) and len(data_fingerprint(a)) == 64
    images = a.images.clone()
    images[7, 0, 13, 13] ^= 1
    assert data_fingerprint(ImageTensors(images, a.labels, a.mean, a.std)) != data_fingerprint(a)
    labels = a.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    assert data_fingerprint(ImageTensors(a.images, labels, a.mean, a.std)) != data_fingerprint(a)
    reshaped = ImageTensors(a.images.reshape(20, 1, 784, 1), a.labels, a.mean, a.std)  # same bytes, other shape
    assert data_fingerprint(reshaped) != data_fingerprint(a)
    assert data_fingerprint(a.subset(torch.arange(19))) != data_fingerprint(a)


def test_registry_names_hints_and_image_size_rules(tmp_path):
    assert DATASETS == ("mnist", "fashion-mnist", "cifar10", "celeba", "imagefolder", "synthetic", "python")
    for name in DATASETS:  # generated or handed-over data reads no folder, and says so
        assert ("<data-root>" in dataset_root_hint(name)) != dataset_root_hint(name).startswith("nothing")
    raises_data_error(lambda: dataset_root_hint("svhn"), "svhn", "cifar10")
    raises_data_error(lambda: load_dataset("svhn", tmp_path), "--dataset", "imagefolder")
    write_idx_mnist(tmp_path, 5, 5)
    assert load_dataset("mnist", tmp_path, image_size=28, download=False).train.images.shape[-1] == 28
    raises_data_error(lambda: load_dataset("mnist", tmp_path, image_size=32, download=False), "--image-size 32")
    write_cifar10(tmp_path, 5, 5)
    raises_data_error(lambda: load_dataset("cifar10", tmp_path, image_size=64, download=False), "32x32")


def test_dataset_splits_refuse_inconsistent_parts():
    part = ImageTensors(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2]), (0.5,), (0.5,))
    other = ImageTensors(torch.zeros(3, 1, 5, 5, dtype=torch.uint8), torch.tensor([0, 1, 2]), (0.5,), (0.5,))
    assert DatasetSplits("x", part, None, part, ("a", "b", "c"), ("g",) * 3, None).image_shape == (1, 4, 4)
    with pytest.raises(ValueError, match="test images"):
        DatasetSplits("x", part, None, other, ("a", "b", "c"), None, None)
    with pytest.raises(ValueError, match="label 2 but only 2 class names"):
        DatasetSplits("x", part, None, part, ("a", "b"), None, None)
    with pytest.raises(ValueError, match="val_groups"):
        DatasetSplits("x", part, None, part, ("a", "b", "c"), None, ("g",) * 3)

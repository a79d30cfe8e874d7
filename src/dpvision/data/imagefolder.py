"""A folder of image files, torchvision ``ImageFolder`` style, decoded once and cached as uint8 tensors.

Layout (what ``scripts/celeba_build_subset.py`` writes; symlinked images and folders are followed)::

    <root>/train/<class>/**/<image>     required
    <root>/val/<class>/**/<image>       optional
    <root>/test/<class>/**/<image>      required

Classes are the subfolder names, sorted (label = position); every split must
have the same ones, each holding at least one image, and a class name must be
valid UTF-8 (it is printed and written to the run's files). Images are the files
with one of :data:`IMAGE_EXTENSIONS` (any case; any file name the OS allows);
other files and names starting with ``.`` are skipped; a symlink back to a parent
folder (a loop) is refused. A FIFO, socket or device named like an image is
refused without being opened; an image that does not decode is a ``DataError``
naming it.

Every image is converted to RGB (grayscale ones too: one channel count for the
whole dataset, whatever mix of files it holds), centre-cropped to a square of
its shorter side, then resized to ``image_size x image_size`` with PIL's
LANCZOS filter (default :data:`DEFAULT_IMAGE_SIZE`, CelebA's preprocessing
default). EXIF orientation is ignored, as in torchvision's loader. Every split is
normalised with the fixed :func:`~dpvision.data.tensors.neutral_stats` (0.5, 0.5),
never with statistics of the images (docs/privacy.md, "Normalisation").

The decoded uint8 tensors are cached in ``<root>/.dpvision-cache/`` or, when
the root is not writable, in ``$XDG_CACHE_HOME/dpvision`` (``~/.cache/dpvision``),
under a key of every image's relative path, label, size and mtime plus
``image_size``: any added, removed, renamed or rewritten image (or another
size) is a new key. The file also holds the SHA-256 of each split's tensor bytes,
checked on every load: a cache that cannot be read, or whose pixels were edited
in place under the same key, is ignored (with a warning) and rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dpvision.data.files import DataError, check_total_bytes, open_regular, regular_file_stat, shown
from dpvision.data.tensors import ImageTensors, neutral_stats

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "test")
DEFAULT_IMAGE_SIZE = 64
#: Largest ``image_size``: 512x512x3 is 0.75 MiB per image as uint8 and 3 MiB as float32; per-example
#: gradients at that resolution are already far beyond what DP-SGD batches fit in memory.
MAX_IMAGE_SIZE = 512
CHANNELS = 3
MAX_SOURCE_PIXELS = 89_478_485  # PIL's decompression-bomb limit: refuse larger source images
MAX_DEPTH = 16  # folder levels below a class folder
CACHE_DIR = ".dpvision-cache"
CACHE_FORMAT = 2  # 2: with the tensors' digests (a format-1 cache is rebuilt)
CACHE_OVERHEAD_BYTES = 16 << 20  # a cache file is its tensors plus this much at most (zip headers, names)
DECODE_THREADS = 4  # PIL decodes and resizes without the GIL
PROGRESS_MIN_IMAGES = 200
RESAMPLE = Image.Resampling.LANCZOS


@dataclass(frozen=True)
class ImageFile:
    path: Path
    rel: str  # path relative to the root, "/"-separated: part of the cache key
    label: int
    size: int
    mtime_ns: int


def check_image_size(image_size: int) -> int:
    """``image_size`` if it is an int in 1..MAX_IMAGE_SIZE, else ``DataError`` naming ``--image-size``."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise DataError(f"--image-size must be an integer from 1 to {MAX_IMAGE_SIZE}, got {image_size!r}")
    return image_size


def _listdir(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as err:
        raise DataError(f"cannot list {shown(folder)}: {err.strerror or err}") from None


def _class_names(split_dir: Path) -> tuple[str, ...]:
    if not split_dir.is_dir():
        raise DataError(f"{shown(split_dir)} is not a directory; an image folder needs train/ and test/ (val/ "
                        "optional), each with one subfolder per class")
    names = tuple(e.name for e in _listdir(split_dir) if not e.name.startswith(".") and e.is_dir())
    if not names:
        raise DataError(f"{shown(split_dir)} has no class subfolders; put each class's images in "
                        f"{shown(split_dir)}/<class>/")
    for name in names:  # a class name is printed and written to config.yaml and summary.json: it must be text
        if shown(name) != name:
            raise DataError(f"class folder {shown(split_dir / name)} has a name that is not valid UTF-8; rename it "
                            "(class names are printed and written to the run's files)")
    return names


def _walk(folder: Path, root: Path, label: int, ancestors: tuple, out: list[ImageFile]) -> None:
    """Append the images under ``folder``, sorted, symlinks followed; a link back to an ancestor is refused."""
    if len(ancestors) > MAX_DEPTH:
        raise DataError(f"{shown(folder)} is more than {MAX_DEPTH} folders deep below its class folder")
    info = os.stat(folder)
    here = (info.st_dev, info.st_ino)
    if here in ancestors:
        raise DataError(f"{shown(folder)} leads back to one of its own parent folders (a symlink loop); remove "
                        "that link")
    for entry in _listdir(folder):
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        if entry.is_dir():
            _walk(path, root, label, (*ancestors, here), out)
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            stat = regular_file_stat(path)  # FIFO, socket, device, broken link: refused, never opened
            out.append(ImageFile(path, path.relative_to(root).as_posix(), label, stat.st_size, stat.st_mtime_ns))


def scan_imagefolder(root: str | os.PathLike) -> tuple[tuple[str, ...], dict[str, list[ImageFile]]]:
    """``(class_names, {split: images in label then path order})`` of the splits present."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data-root {shown(root)!r} is not a directory; for imagefolder it must hold train/ and "
                        "test/ (val/ optional), each with one subfolder per class")
    present = [s for s in SPLITS if s in REQUIRED_SPLITS or os.path.lexists(root / s)]
    names = {split: _class_names(root / split) for split in present}
    class_names = names["train"]
    if len(class_names) < 2:
        raise DataError(f"{shown(root / 'train')} has one class subfolder ({class_names[0]}); a classifier needs at "
                        "least 2")
    splits = {}
    for split in present:
        if names[split] != class_names:
            raise DataError(f"{shown(root / split)} has classes {list(names[split])} but {shown(root / 'train')} "
                            f"has {list(class_names)}; every split needs the same class subfolders")
        files: list[ImageFile] = []
        for label, name in enumerate(class_names):
            before = len(files)
            _walk(root / split / name, root, label, (), files)
            if len(files) == before:  # in every split: a class missing from test or val is no measurement of it
                raise DataError(f"{shown(root / split / name)} holds no images (extensions: "
                                f"{', '.join(IMAGE_EXTENSIONS)})")
        splits[split] = files
    return class_names, splits


def decode_image(path: Path, size: int) -> np.ndarray:
    """uint8 [3, size, size]: RGB, centre square crop of the shorter side, LANCZOS resize."""
    try:
        with open_regular(path) as handle, Image.open(handle) as img:
            width, height = img.size
            if width * height > MAX_SOURCE_PIXELS:
                raise DataError(f"{shown(path)} is {width}x{height} pixels, more than the {MAX_SOURCE_PIXELS} "
                                "allowed")
            img = img.convert("RGB")
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2  # floor: the same pixels on every run
            img = img.crop((left, top, left + side, top + side))
            if img.size != (size, size):
                img = img.resize((size, size), RESAMPLE)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except DataError:
        raise
    except Exception as err:  # UnidentifiedImageError, truncated file, DecompressionBombError, ...
        raise DataError(f"cannot decode image {shown(path)}: {type(err).__name__}: {shown(str(err))}") from None


def cache_key(class_names: tuple[str, ...], splits: dict[str, list[ImageFile]], image_size: int) -> str:
    """sha256 hex of the format, size, classes and every image's (split, path, label, bytes, mtime).

    Paths are hashed as the OS's bytes (``surrogateescape``), so a file name that is not UTF-8 is fine.
    """
    digest = hashlib.sha256(f"dpvision-imagefolder-cache v{CACHE_FORMAT}\nsize {image_size}\n".encode())
    digest.update(("\n".join(class_names) + "\n\n").encode())
    for split, files in splits.items():
        for f in files:
            digest.update(f"{split}\t{f.rel}\t{f.label}\t{f.size}\t{f.mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def tensor_digest(images: torch.Tensor) -> str:
    """sha256 hex of a tensor's dtype, shape and bytes: what the cache stores beside each split's images."""
    images = images.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{images.dtype} {list(images.shape)}\n".encode())
    digest.update(memoryview(images.numpy()).cast("B"))
    return digest.hexdigest()


def _cache_places(root: Path, image_size: int) -> list[tuple[Path, str]]:
    """``(folder, file-name prefix)`` to try: inside the root, then the user's cache (tagged with the root)."""
    places = [(root / CACHE_DIR, f"imagefolder-s{image_size}-")]
    try:
        user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dpvision"
    except RuntimeError:  # no home directory: only the root's own cache
        return places
    root_tag = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:16]  # the OS bytes: any name works
    return [*places, (user, f"imagefolder-{root_tag}-s{image_size}-")]


def _read_cache(path: Path, key: str, splits: dict[str, list[ImageFile]], image_size: int):
    """``{split: images uint8 [n, 3, S, S]}`` from a cache file, or None if it is absent, not this data or edited."""
    if not path.is_file():
        return None
    expected = sum(len(files) for files in splits.values()) * CHANNELS * image_size**2
    try:
        with open_regular(path, max_bytes=expected + CACHE_OVERHEAD_BYTES) as handle:
            payload = torch.load(handle, map_location="cpu", weights_only=True)
        if payload.get("format") != CACHE_FORMAT or payload.get("key") != key:
            return None
        out = {}
        for split, files in splits.items():
            images = payload[f"{split}_images"]
            if images.dtype != torch.uint8 or tuple(images.shape) != (len(files), CHANNELS, image_size, image_size):
                raise ValueError(f"{split} images are {images.dtype} {tuple(images.shape)}")
            out[split] = images
        digests = payload["digests"]
        if not isinstance(digests, dict):
            raise ValueError(f"digests are a {type(digests).__name__}, not a dict")
    except Exception as err:  # a cache is ours to rebuild: never an error
        warnings.warn(f"ignoring unreadable image cache {shown(path)} ({type(err).__name__}: {err}); rebuilding it")
        return None
    edited = [split for split, images in out.items() if digests.get(split) != tensor_digest(images)]
    if edited:  # same key, other pixels: the file was changed after it was written
        warnings.warn(f"ignoring image cache {shown(path)}: its {', '.join(edited)} images do not match the "
                      "digest stored with them; rebuilding it from the image files")
        return None
    return out


def _write_cache(path: Path, payload: dict, prefix: str) -> None:
    """Write the cache atomically (temporary file, then rename); remove older caches of the same root and size."""
    from dpvision.runs import atomic_torch_save

    atomic_torch_save(payload, path)
    for old in path.parent.glob(f"{prefix}*.pt"):
        if old != path:
            old.unlink(missing_ok=True)


def _decode_split(files: list[ImageFile], image_size: int, split: str) -> torch.Tensor:
    images = np.empty((len(files), CHANNELS, image_size, image_size), dtype=np.uint8)  # [n, 3, S, S]
    disable = None if len(files) >= PROGRESS_MIN_IMAGES else True
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        decoded = pool.map(lambda f: decode_image(f.path, image_size), files)
        for i, array in enumerate(tqdm(decoded, total=len(files), desc=f"decoding {split}", unit="img",
                                       disable=disable)):
            images[i] = array
    return torch.from_numpy(images)


def load_imagefolder(root: str | os.PathLike, image_size: int | None = None,
                     ) -> tuple[dict[str, ImageTensors], tuple[str, ...]]:
    """``({split: ImageTensors}, class_names)``, every split with the fixed ``neutral_stats`` (never the data's)."""
    root = Path(root)
    image_size = check_image_size(DEFAULT_IMAGE_SIZE if image_size is None else image_size)
    class_names, splits = scan_imagefolder(root)
    total = sum(len(files) for files in splits.values())
    check_total_bytes(total * CHANNELS * image_size**2, f"{total} images of {CHANNELS}x{image_size}x{image_size} "
                      f"under {root}", "use a smaller --image-size or fewer images")
    key = cache_key(class_names, splits, image_size)
    places = _cache_places(root, image_size)
    images = None
    for folder, prefix in places:
        images = _read_cache(folder / f"{prefix}{key[:32]}.pt", key, splits, image_size)
        if images is not None:
            break
    if images is None:
        images = {split: _decode_split(files, image_size, split) for split, files in splits.items()}
        payload = {"format": CACHE_FORMAT, "key": key, "class_names": list(class_names),
                   "digests": {split: tensor_digest(tensor) for split, tensor in images.items()},
                   **{f"{split}_images": tensor for split, tensor in images.items()}}
        for folder, prefix in places:
            try:
                _write_cache(folder / f"{prefix}{key[:32]}.pt", payload, prefix)
                break
            except OSError:  # read-only root: try the user's cache next
                continue
        else:
            warnings.warn(f"could not write an image cache in {' or '.join(shown(p[0]) for p in places)}; images "
                          "will be decoded again next time")
    mean, std = neutral_stats(CHANNELS)  # data-independent: statistics of the training images would escape ε
    out = {split: ImageTensors(images[split], torch.tensor([f.label for f in files], dtype=torch.int64), mean, std)
           for split, files in splits.items()}
    return out, class_names

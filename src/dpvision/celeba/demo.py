"""Synthetic CelebA-style archives for demos and tests (no download needed).

``make_demo_archive(out, n, seed)`` writes ``n`` 178x218 JPEG cartoon faces in
the Kaggle layout (see :mod:`dpvision.celeba.archive`), with all five tables.
Every face is drawn from its own landmarks: the eyes, nose and mouth corners
written to the landmark table are exactly where they are drawn, and when
``Eyeglasses`` is 1 the frames are drawn around those eye positions (plus a
bridge and temples), so a classifier can learn the attribute and a landmark-
based statistic (interocular distance, 25-50 px) is meaningful.

Choices, and why:

* ``EYEGLASSES_RATE`` is 20% (real CelebA: ~6.5%) so that a 2,000-image demo
  still has a few hundred positives; it is higher for men than for women
  (26% vs 16%), so stratifying by ``Male`` changes something.
* The other 39 attributes follow CelebA's marginal rates roughly, with the
  obvious constraints (women have no beard, one hair colour at most, bald means
  no hair); hair colour, baldness, bangs, smiling, open mouth, lipstick, pale
  skin, narrow eyes, hats, beards and blur are drawn, the rest are labels only.
* Partitions are an exact 80/10/10 seeded shuffle (no identities exist here).
* Each image has its own seed ``derive_seed(seed, "demo-image:<index>")``, so the
  bytes do not depend on the number of worker processes.
* The archive is staged and renamed into place with a ``.dpvision-output``
  marker, so ``--overwrite`` can replace an earlier demo archive but never a
  real CelebA download (:mod:`dpvision.celeba.safety`).

Example:
    >>> make_demo_archive("/tmp/celeba_demo", n=200, seed=0)   # doctest: +SKIP
    {'n': 200, 'eyeglasses': 41, ...}
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import random
import signal

from PIL import Image, ImageDraw, ImageFilter

from dpvision.celeba.archive import (
    ATTR_FILE, ATTRIBUTE_NAMES, BBOX_COLUMNS, BBOX_FILE, IMAGE_DIR, LANDMARK_COLUMNS, LANDMARKS_FILE,
    PARTITION_FILE, CelebaDataError,
)  # fmt: skip
from dpvision.celeba.safety import prepare_output, staged_output
from dpvision.runs import atomic_write_text
from dpvision.seeding import derive_seed

WIDTH, HEIGHT = 178, 218  # CelebA's aligned-and-cropped image size
IOD_RANGE = (25.0, 50.0)  # interocular distance in pixels (real aligned CelebA: ~35-45)
ROLL_DEGREES = 12.0  # maximum head roll either way
EYEGLASSES_RATE = {"male": 0.26, "female": 0.16}  # ~20% overall with P(Male) = 0.42
JPEG_QUALITY = 90
PARTITION_FRACTIONS = (0.8, 0.1, 0.1)
PARALLEL_THRESHOLD = 500  # below this many images, worker start-up costs more than it saves
OUTPUT_KIND = "celeba-demo-archive"  # the marker kind: --overwrite replaces only a folder of this kind

# Approximate positive rates in real CelebA, used for the attributes only written as labels.
_BASE_RATES = {
    "Arched_Eyebrows": 0.27, "Attractive": 0.51, "Bags_Under_Eyes": 0.20, "Bangs": 0.15, "Big_Lips": 0.24,
    "Big_Nose": 0.23, "Blurry": 0.05, "Bushy_Eyebrows": 0.14, "Chubby": 0.06, "Double_Chin": 0.05,
    "High_Cheekbones": 0.45, "Mouth_Slightly_Open": 0.48, "Narrow_Eyes": 0.12, "Oval_Face": 0.28,
    "Pale_Skin": 0.04, "Pointy_Nose": 0.28, "Receding_Hairline": 0.08, "Rosy_Cheeks": 0.07, "Smiling": 0.48,
    "Straight_Hair": 0.21, "Wavy_Hair": 0.32, "Wearing_Earrings": 0.19, "Wearing_Hat": 0.05,
    "Wearing_Necklace": 0.12, "Young": 0.77,
}  # fmt: skip
_HAIR_COLOURS = {
    "Black_Hair": (25, 20, 18), "Brown_Hair": (100, 62, 35), "Blond_Hair": (215, 185, 110),
    "Gray_Hair": (165, 165, 160), None: (70, 45, 30),
}  # fmt: skip
_SKIN = [(241, 200, 170), (224, 172, 138), (198, 140, 100), (160, 105, 70), (110, 72, 48)]


def sample_attributes(rng: random.Random) -> dict[str, int]:
    """All 40 attributes in {-1, 1}, plausible together (e.g. no beard on women)."""
    a = {name: 1 if rng.random() < rate else -1 for name, rate in _BASE_RATES.items()}
    male = rng.random() < 0.42
    a["Male"] = 1 if male else -1
    a["Eyeglasses"] = 1 if rng.random() < EYEGLASSES_RATE["male" if male else "female"] else -1
    beard = male and rng.random() < 0.25
    for name in ("5_o_Clock_Shadow", "Goatee", "Mustache", "Sideburns"):
        a[name] = 1 if beard and rng.random() < 0.5 else -1
    a["No_Beard"] = -1 if beard else 1
    a["Heavy_Makeup"] = 1 if not male and rng.random() < 0.65 else -1
    a["Wearing_Lipstick"] = 1 if not male and rng.random() < 0.8 else -1
    a["Wearing_Necktie"] = 1 if male and rng.random() < 0.17 else -1
    a["Bald"] = 1 if male and rng.random() < 0.05 else -1
    hair = None
    if a["Bald"] < 0:
        hair = rng.choices(["Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair", None], [0.26, 0.23, 0.16, 0.05, 0.30])[0]
        if hair == "Gray_Hair" and a["Young"] > 0:
            hair = "Black_Hair"  # gray hair is rare among the young
    for name in ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair"):
        a[name] = 1 if name == hair else -1
    if a["Bald"] > 0:
        a["Bangs"] = a["Wavy_Hair"] = a["Straight_Hair"] = -1
    if a["Mouth_Slightly_Open"] > 0 and a["Smiling"] < 0 and rng.random() < 0.5:
        a["Smiling"] = 1  # open mouths are mostly smiles in CelebA
    return {name: a[name] for name in ATTRIBUTE_NAMES}


class _Pen:
    """Draws in face units (1 = interocular distance), face-local x right and y down, rotated by the head roll."""

    def __init__(self, draw: ImageDraw.ImageDraw, centre: tuple[float, float], angle: float, iod: float) -> None:
        self.draw, (self.cx, self.cy), self.iod = draw, centre, iod
        self.cos, self.sin = math.cos(angle), math.sin(angle)

    def _rot(self, x: float, y: float) -> tuple[float, float]:
        """Face-local pixels (x right, y down) -> image coordinates, rotated by the head roll."""
        return self.cx + x * self.cos - y * self.sin, self.cy + x * self.sin + y * self.cos

    def P(self, x: float, y: float) -> tuple[float, float]:  # noqa: N802  (a point, as in the drawing code)
        """Face units -> image coordinates."""
        return self._rot(x * self.iod, y * self.iod)

    def E(self, x0: float, y0: float, a: float, b: float, n: int = 32, start: float = 0.0,  # noqa: N802
          stop: float = 2 * math.pi) -> list[tuple[float, float]]:
        """Points of a rotated ellipse (or an arc of it) centred at face-local (x0, y0), in face units."""
        steps = [start + (stop - start) * k / (n - 1 if stop - start < 2 * math.pi else n) for k in range(n)]
        # Scaled to pixels before the sum, so every point is the float it always was (same JPEG bytes).
        x0, y0, a, b = x0 * self.iod, y0 * self.iod, a * self.iod, b * self.iod
        return [self._rot(x0 + a * math.cos(t), y0 + b * math.sin(t)) for t in steps]


def _background(draw: ImageDraw.ImageDraw, rng: random.Random) -> None:
    for _ in range(rng.randrange(2, 6)):  # background variety: random blocks and blobs
        x0, y0 = rng.randrange(-40, WIDTH), rng.randrange(-40, HEIGHT)
        box = [x0, y0, x0 + rng.randrange(30, 160), y0 + rng.randrange(30, 160)]
        colour = tuple(rng.randrange(20, 240) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=colour)


def _head(pen: _Pen, rng: random.Random, attrs: dict[str, int]) -> tuple[float, float, tuple, str | None]:
    """Hair, face, beard, hairline and hat; returns (face_a, face_b, skin colour, hair name)."""
    P, E, draw = pen.P, pen.E, pen.draw  # noqa: N806
    male, chubby = attrs["Male"] > 0, attrs["Chubby"] > 0
    face_a = rng.uniform(0.95, 1.1) * (1.12 if chubby else 1.0) * (1.05 if male else 1.0)
    face_b = rng.uniform(1.35, 1.55)
    skin = _SKIN[rng.randrange(len(_SKIN))] if attrs["Pale_Skin"] < 0 else (250, 228, 215)
    skin = tuple(min(255, max(0, c + rng.randrange(-12, 13))) for c in skin)
    hair_name = next((h for h in ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair") if attrs[h] > 0), None)
    hair = _HAIR_COLOURS[hair_name]

    if attrs["Bald"] < 0:  # hair behind the head, longer for women
        draw.polygon(E(0, 0.25, face_a * 1.22, face_b * (1.2 if male else 1.45)), fill=hair)
    draw.polygon(E(0, 0.45, face_a, face_b), fill=skin)  # the face
    if attrs["No_Beard"] < 0:
        draw.polygon(E(0, 0.45, face_a * 0.98, face_b * 0.98, start=0.15 * math.pi, stop=0.85 * math.pi), fill=hair)
    if attrs["Bald"] < 0:  # hairline / bangs over the forehead
        depth = -0.45 if attrs["Bangs"] > 0 else -0.7
        draw.polygon(E(0, 0.45, face_a * 1.02, face_b * 1.02, start=1.05 * math.pi, stop=1.95 * math.pi) + [P(0.9, depth), P(-0.9, depth)], fill=hair)
    if attrs["Wearing_Hat"] > 0:
        hat = tuple(rng.randrange(0, 200) for _ in range(3))
        draw.polygon([P(-1.5, -0.75), P(1.5, -0.75), P(1.0, -1.6), P(-1.0, -1.6)], fill=hat)
    return face_a, face_b, skin, hair_name


def _eyes(pen: _Pen, rng: random.Random, attrs: dict[str, int], hair_name: str | None) -> None:
    P, E, draw, iod = pen.P, pen.E, pen.draw, pen.iod  # noqa: N806
    eye_h = 0.06 if attrs["Narrow_Eyes"] > 0 else 0.1
    iris = tuple(rng.randrange(20, 120) for _ in range(3))
    brow_w = max(1, round(iod * (0.09 if attrs["Bushy_Eyebrows"] > 0 else 0.05)))
    for side in (-0.5, 0.5):
        draw.polygon(E(side, 0, 0.19, eye_h), fill=(245, 245, 240))
        draw.polygon(E(side, 0, 0.07, min(eye_h, 0.07)), fill=iris)
        draw.line([P(side - 0.2, -0.24), P(side, -0.3), P(side + 0.2, -0.24)], fill=_HAIR_COLOURS[hair_name] if hair_name else (60, 40, 30), width=brow_w)


def _nose_and_mouth(pen: _Pen, rng: random.Random, attrs: dict[str, int], skin: tuple) -> list[tuple[float, float]]:
    """Draws the nose and mouth; returns the five landmarks (eyes, nose, mouth corners) in image coordinates."""
    P, E, draw, iod = pen.P, pen.E, pen.draw, pen.iod  # noqa: N806
    nose = (rng.uniform(-0.05, 0.05), rng.uniform(0.55, 0.7))
    shade = tuple(int(c * 0.75) for c in skin)
    draw.line([P(0, 0.15), P(nose[0] + 0.06, nose[1])], fill=shade, width=max(1, round(iod / 25)))
    draw.line([P(nose[0] - 0.12, nose[1]), P(nose[0] + 0.12, nose[1])], fill=shade, width=max(1, round(iod / 20)))

    mouth_y, mouth_w = rng.uniform(1.0, 1.12), rng.uniform(0.38, 0.48)
    lips = (190, 30, 50) if attrs["Wearing_Lipstick"] > 0 else (165, 85, 80)
    lw = max(2, round(iod / 14))
    if attrs["Mouth_Slightly_Open"] > 0:
        draw.polygon(E(0, mouth_y + 0.04, mouth_w * 0.8, 0.1), fill=(60, 20, 25))
    if attrs["Smiling"] > 0:
        draw.line(E(0, mouth_y - 0.08, mouth_w, 0.16, n=12, start=0.1 * math.pi, stop=0.9 * math.pi), fill=lips, width=lw)
    else:
        draw.line([P(-mouth_w, mouth_y), P(0, mouth_y + 0.03), P(mouth_w, mouth_y)], fill=lips, width=lw)
    return [P(-0.5, 0), P(0.5, 0), P(*nose), P(-mouth_w, mouth_y), P(mouth_w, mouth_y)]


def _glasses(pen: _Pen, rng: random.Random, face_a: float) -> None:
    """Frames centred on the eye landmarks."""
    P, E, draw = pen.P, pen.E, pen.draw  # noqa: N806
    frame = tuple(rng.randrange(0, 90) for _ in range(3))
    width = max(2, round(pen.iod / rng.uniform(9, 14)))
    fa, fb = rng.uniform(0.27, 0.33), rng.uniform(0.18, 0.25)
    tinted = rng.random() < 0.2  # sunglasses count as Eyeglasses in CelebA
    for side in (-0.5, 0.5):
        ring = E(side, 0, fa, fb, n=24)
        if tinted:
            draw.polygon(ring, fill=(30, 30, 35))
        draw.line(ring + ring[:1], fill=frame, width=width, joint="curve")
    draw.line([P(-0.5 + fa, -0.03), P(0.5 - fa, -0.03)], fill=frame, width=width)  # bridge
    for sign in (-1, 1):
        draw.line([P(sign * (0.5 + fa), -0.02), P(sign * face_a * 0.98, -0.05)], fill=frame, width=width)  # temples


def render_face(index: int, seed: int, force: dict[str, int] | None = None) -> tuple[bytes, dict[str, int], list[int], list[int]]:
    """One demo image: ``(jpeg bytes, attributes, landmarks [10], bbox [4])``, a pure function of (index, seed).

    ``force`` overrides sampled attributes (e.g. ``{"Eyeglasses": 1}``) without
    changing anything else about the face, which is how the tests check that the
    glasses sit on the landmarks.
    """
    rng = random.Random(derive_seed(seed, f"demo-image:{index}"))
    attrs = sample_attributes(rng)
    attrs.update(force or {})
    img = Image.new("RGB", (WIDTH, HEIGHT), tuple(rng.randrange(40, 230) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    _background(draw, rng)
    iod = rng.uniform(*IOD_RANGE)
    angle = math.radians(rng.uniform(-ROLL_DEGREES, ROLL_DEGREES))
    cx = WIDTH / 2 + rng.uniform(-8, 8)  # eye midpoint
    cy = 108 + rng.uniform(-8, 8)
    pen = _Pen(draw, (cx, cy), angle, iod)
    face_a, face_b, skin, hair_name = _head(pen, rng, attrs)
    _eyes(pen, rng, attrs, hair_name)
    landmarks = _nose_and_mouth(pen, rng, attrs, skin)
    if attrs["Eyeglasses"] > 0:
        _glasses(pen, rng, face_a)
    if attrs["Blurry"] > 0:
        img = img.filter(ImageFilter.GaussianBlur(1.5))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=JPEG_QUALITY)
    corners = [pen.P(sx * face_a, 0.45 + sy * face_b) for sx in (-1, 1) for sy in (-1, 1)]
    x1, y1 = min(p[0] for p in corners), min(p[1] for p in corners)
    x2, y2 = max(p[0] for p in corners), max(p[1] for p in corners)
    bbox = [round(x1), round(y1), round(x2 - x1), round(y2 - y1)]
    return out.getvalue(), attrs, [round(v) for p in landmarks for v in p], bbox


def _render_to_file(job: tuple[int, int, str]) -> tuple[int, dict[str, int], list[int], list[int]]:
    index, seed, image_dir = job
    data, attrs, landmarks, bbox = render_face(index, seed)
    with open(os.path.join(image_dir, image_id(index)), "wb") as handle:
        handle.write(data)
    return index, attrs, landmarks, bbox


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops them: one ``interrupted`` line, not one traceback each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def image_id(index: int) -> str:
    """CelebA's file naming: index 0 -> ``000001.jpg``."""
    return f"{index + 1:06d}.jpg"


def _partitions(n: int, seed: int) -> list[int]:
    """Exact 80/10/10 split, shuffled with a seed of its own (the images have no identities)."""
    n_train, n_val = int(n * PARTITION_FRACTIONS[0]), int(n * PARTITION_FRACTIONS[1])
    codes = [0] * n_train + [1] * n_val + [2] * (n - n_train - n_val)
    random.Random(derive_seed(seed, "demo-partition")).shuffle(codes)
    return codes


def _tables(ids, attrs, landmarks, bboxes, parts, fmt: str) -> dict[str, str]:
    """The four annotation files' text in the Kaggle CSV or the original TXT layout."""
    n = len(ids)
    if fmt == "csv":
        def table(cols, rows):
            return ",".join(("image_id",) + tuple(cols)) + "\n" + "".join(
                ",".join([i] + [str(v) for v in r]) + "\n" for i, r in zip(ids, rows))
        return {
            f"{ATTR_FILE}.csv": table(ATTRIBUTE_NAMES, attrs),
            f"{LANDMARKS_FILE}.csv": table(LANDMARK_COLUMNS, landmarks),
            f"{PARTITION_FILE}.csv": table(("partition",), [[p] for p in parts]),
            f"{BBOX_FILE}.csv": table(BBOX_COLUMNS, bboxes),
        }

    def txt(header, rows, pad=4):
        head = f"{n}\n{header}\n" if header is not None else ""
        return head + "".join(i + " " + " ".join(f"{v:>{pad}}" for v in r) + "\n" for i, r in zip(ids, rows))
    return {
        f"{ATTR_FILE}.txt": txt(" ".join(ATTRIBUTE_NAMES) + " ", attrs, pad=2),
        f"{LANDMARKS_FILE}.txt": txt(" ".join(LANDMARK_COLUMNS), landmarks),
        f"{PARTITION_FILE}.txt": txt(None, [[p] for p in parts], pad=1),
        f"{BBOX_FILE}.txt": txt("image_id " + " ".join(BBOX_COLUMNS), bboxes),
    }


def make_demo_archive(out_dir: str | os.PathLike, n: int = 2000, seed: int = 0, *, workers: int | None = None,
                      fmt: str = "csv", nested: bool = True, overwrite: bool = False) -> dict:
    """Write a synthetic CelebA archive with ``n`` images to ``out_dir``; returns a small summary.

    ``fmt`` is ``"csv"`` (Kaggle) or ``"txt"`` (original release); ``nested``
    puts the images in ``img_align_celeba/img_align_celeba/`` as Kaggle does.
    The archive is built in a temporary sibling folder and renamed into place,
    so an interrupted run leaves nothing behind (a killed one's folder is removed
    by the next run). ``overwrite`` replaces only an earlier demo archive.
    Same (n, seed, fmt) -> same bytes.
    """
    if n < 1:
        raise CelebaDataError(f"--n must be at least 1, got {n}")
    if fmt not in ("csv", "txt"):
        raise CelebaDataError(f"--format must be 'csv' or 'txt', got {fmt!r}")
    output = dict(kind=OUTPUT_KIND, flag="--out", overwrite=overwrite)
    prepare_output(out_dir, **output)  # refuse a bad --out before drawing anything
    with staged_output(out_dir, **output) as tmp:
        image_dir = tmp / IMAGE_DIR / IMAGE_DIR if nested else tmp / IMAGE_DIR
        image_dir.mkdir(parents=True)
        jobs = [(i, seed, str(image_dir)) for i in range(n)]
        workers = workers if workers is not None else (os.cpu_count() or 1)
        if workers > 1 and n >= PARALLEL_THRESHOLD:
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            with context.Pool(workers, initializer=_ignore_sigint) as pool:  # Ctrl-C: leaving the block stops them
                results = pool.map(_render_to_file, jobs, chunksize=max(1, n // (workers * 8)))
        else:
            results = [_render_to_file(job) for job in jobs]
        results.sort(key=lambda r: r[0])
        ids = [image_id(r[0]) for r in results]
        attrs = [[r[1][name] for name in ATTRIBUTE_NAMES] for r in results]
        parts = _partitions(n, seed)
        for name, text in _tables(ids, attrs, [r[2] for r in results], [r[3] for r in results], parts, fmt).items():
            atomic_write_text(tmp / name, text)
    glasses = sum(1 for a in attrs if a[ATTRIBUTE_NAMES.index("Eyeglasses")] > 0)
    return {"out": str(out_dir), "n": n, "seed": seed, "format": fmt, "eyeglasses": glasses,
            "partitions": {s: parts.count(c) for s, c in (("train", 0), ("val", 1), ("test", 2))}}

"""Checking the images a subset chose: every one is opened and decoded, a bad one is replaced.

Used by :func:`dpvision.celeba.subset.build_subset` (step 4 of its strategy):
a missing or unreadable image is swapped for the next image of its split,
class and stratum in the same seeded order; when none is left, one image of the
other class of that stratum is dropped as well, so the balance holds. A FIFO or
other non-file where an image should be is refused outright (by ``stat``; it
is never opened, which would block forever).
"""

from __future__ import annotations

import os

from PIL import Image

from dpvision.celeba.archive import CelebaDataError
from dpvision.celeba.safety import check_image_size, file_problem, interruptible_map

VERIFY_THREADS = 4  # PIL decodes without the GIL, so threads overlap file reads and decoding


def verify_image(path: str | os.PathLike) -> str | None:
    """``None`` if ``path`` is a readable image, else why not ("missing" or "unreadable: ...").

    A FIFO or other non-file raises :class:`CelebaDataError` (found by ``stat``, never opened).
    """
    problem = file_problem(path)
    if problem is not None:
        return problem
    try:
        with Image.open(path) as img:
            check_image_size(*img.size, path)  # before any decoding: a huge image could exhaust memory
            img.verify()  # structure check; the image cannot be used afterwards, hence the reopen
        with Image.open(path) as img:
            img.load()  # full decode catches truncated data that verify() misses
    except CelebaDataError as err:
        return f"unreadable: {err}"
    except FileNotFoundError:
        return "missing"
    except Exception as err:  # PIL raises many types for corrupt files
        return f"unreadable: {type(err).__name__}: {err}"
    return None


def replace_bad_images(archive, selected, reserves, strict: bool, disable: bool | None) -> tuple[list[dict], list[dict]]:
    """Open every chosen image; swap a bad one for the next in its group's seeded order.

    When a group runs out of spares (the minority class usually has none), the
    same number of images is dropped from the other class of that stratum, so
    the balance holds. Returns ``(replacements, drops)``; ``selected`` is edited.
    """
    jobs = [(key, i) for key, chosen in selected.items() for i in chosen]
    paths = [archive.image_path(archive.image_ids[i]) for _, i in jobs]
    results = interruptible_map(verify_image, paths, threads=VERIFY_THREADS, desc="verifying images",
                                disable=disable)
    replacements, drops = [], []
    good: dict[tuple, list[int]] = {key: [] for key in selected}
    for (key, i), problem in zip(jobs, results):
        while problem is not None:
            bad = archive.image_ids[i]
            if strict:
                raise CelebaDataError(f"image {archive.image_path(bad)} is {problem} (--strict-missing)")
            if not reserves[key]:
                drops.append({"image_id": bad, "reason": problem, "split": key[0], "label": key[1], "stratum": key[2]})
                break
            new = reserves[key].pop(0)
            replacements.append({"image_id": bad, "reason": problem, "split": key[0], "label": key[1],
                                 "stratum": key[2], "replaced_by": archive.image_ids[new]})
            i = new
            problem = verify_image(archive.image_path(archive.image_ids[new]))
        if problem is None:
            good[key].append(i)
    for (split, label, stratum), chosen in good.items():
        other = good[(split, 1 - label, stratum)]
        while len(other) > len(chosen):  # keep both classes of the stratum the same size
            dropped = other.pop()
            drops.append({"image_id": archive.image_ids[dropped], "reason": "balance", "split": split,
                          "label": 1 - label, "stratum": stratum})
    selected.update(good)
    return replacements, drops

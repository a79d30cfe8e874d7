"""Command-line front ends: ``dpvision celeba <make-demo-archive|build-subset|preprocess>``.

``add_subcommands(subparsers)`` hangs a ``celeba`` command with its three
sub-commands on the ``dpvision`` console script; each parsed namespace carries
``func(args) -> int`` (the exit status). The thin scripts
``scripts/celeba_build_subset.py`` and ``scripts/celeba_preprocess.py`` call
:func:`build_subset_main` and :func:`preprocess_main`.

Every bad input becomes one line ``error: ...`` on stderr and exit status 2
(argparse uses 2 for bad flags too); warnings are ``warning: ...`` lines.
Ctrl-C prints ``interrupted`` and exits with 130, leaving no staging folder
behind. Outputs are staged and renamed into place, and ``--overwrite`` only
replaces a folder the same command wrote (:mod:`dpvision.celeba.safety`).

Example:
    >>> build_subset_main(["--archive-dir", "data/celeba/archive", "--output-dir", "out",   # doctest: +SKIP
    ...                    "--use-landmarks", "--stratify-by", "interocular", "--total", "20000"])
    0
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

from dpvision.celeba.archive import SPLITS, CelebaDataError
from dpvision.celeba.subset import DEFAULT_ARCHIVE_DIR, DEFAULT_SEED, LINK_MODES

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn data errors into ``error: ...`` + exit status 2, and Ctrl-C into ``interrupted`` + 130.

    The commands remove their staging folders on the way out (``safety.staged_output``),
    so by the time these lines print nothing half-written is left.
    """

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except CelebaDataError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as err:  # e.g. an input that vanished; writes are reported by staged_output
            where = f"{err.filename}: " if err.filename else ""
            print(f"error: {where}{err.strerror or err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    run.__name__ = fn.__name__
    return run


def add_build_subset_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--archive-dir", default=DEFAULT_ARCHIVE_DIR, help="CelebA archive (Kaggle or original layout)")
    p.add_argument("--attribute", default="Eyeglasses", help="any of CelebA's 40 attributes (default: Eyeglasses)")
    p.add_argument("--use-landmarks", action="store_true", help="read landmarks and compute interocular distance")
    p.add_argument("--stratify-by", nargs="+", default=[], metavar="VAR",
                   help="'interocular' and/or attribute names, space- or comma-separated")
    p.add_argument("--iod-bins", type=int, default=4, help="quantile bins of interocular distance (train)")
    p.add_argument("--output-dir", required=True, help="new folder for <split>/<class>/<image> and the index")
    p.add_argument("--link-mode", choices=LINK_MODES, default="symlink")
    for split in ("train", "val", "test"):
        p.add_argument(f"--max-per-class-{split}", type=int, default=None, help=f"cap per class in {split}")
    p.add_argument("--total", type=int, default=None,
                   help="caps from the ratio policy: floor(0.8N/2), floor(0.1N/2), floor(0.1N/2) per class")
    p.add_argument("--min-iod", type=float, default=None, help="keep images with interocular distance >= this")
    p.add_argument("--max-iod", type=float, default=None, help="keep images with interocular distance <= this")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an --output-dir that build-subset wrote")
    p.add_argument("--strict-missing", action="store_true", help="fail on a missing/unreadable image instead of replacing it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def add_preprocess_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--subset-dir", required=True, help="folder made by celeba_build_subset.py")
    p.add_argument("--output-dir", required=True, help="new folder for <split>.pt and stats.json")
    p.add_argument("--size", type=int, default=64, help="output side length in pixels (default 64)")
    p.add_argument("--crop", type=int, default=178, help="centre crop side length before resizing (default 178)")
    p.add_argument("--overwrite", action="store_true", help="replace an --output-dir that preprocess wrote")
    p.add_argument("--no-progress", action="store_true")
    return p


def add_demo_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="new archive folder")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("csv", "txt"), default="csv", help="Kaggle CSVs or the original .txt files")
    p.add_argument("--flat", action="store_true", help="img_align_celeba/ instead of Kaggle's nested folder")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that make-demo-archive wrote")
    return p


def format_plan(summary: dict) -> str:
    """The per-split, per-class, per-stratum counts of a subset summary as a few readable lines."""
    lines = [f"attribute {summary['attribute']}: classes {summary['class_names']} (labels 0, 1), seed {summary['seed']}"]
    if summary.get("iod_bin_edges") is not None:
        lines.append(f"interocular bin edges ({summary['iod_bin_method']}, from train): "
                     + ", ".join(f"{e:.2f}" for e in summary["iod_bin_edges"]))
    for split in SPLITS:
        t = summary["totals"][split]
        avail = summary["available"][split]
        lines.append(f"{split}: {t['total']} images, cap {summary['caps'][split]} per class "
                     f"({summary['cap_source'][split]}); available " + ", ".join(f"{k}={v}" for k, v in avail.items()))
        for name in summary["class_names"]:
            strata = summary["counts"][split][name]
            lines.append(f"  {name:<20} {t[name]:>7}" + ("   " + ", ".join(f"{k}: {v}" for k, v in strata.items())
                                                        if list(strata) != ["all"] else ""))
    if "replacements" in summary:
        lines.append(f"replaced images: {summary['replacements']['total']}")
    return "\n".join(lines)


@_guard
def run_build_subset(args: argparse.Namespace) -> int:
    from dpvision.celeba.subset import build_subset

    start = time.perf_counter()
    summary = build_subset(
        args.archive_dir, args.output_dir, attribute=args.attribute, use_landmarks=args.use_landmarks,
        stratify_by=args.stratify_by, iod_bins=args.iod_bins, link_mode=args.link_mode,
        max_per_class_train=args.max_per_class_train, max_per_class_val=args.max_per_class_val,
        max_per_class_test=args.max_per_class_test, total=args.total, min_iod=args.min_iod, max_iod=args.max_iod,
        seed=args.seed, dry_run=args.dry_run, overwrite=args.overwrite, strict_missing=args.strict_missing,
        progress=False if args.no_progress else None,
    )
    print(format_plan(summary))
    if args.dry_run:
        print("dry run: nothing written")
    else:
        print(f"wrote {summary['total']} images to {args.output_dir} ({args.link_mode}) "
              f"in {time.perf_counter() - start:.1f}s")
    return 0


@_guard
def run_preprocess(args: argparse.Namespace) -> int:
    from dpvision.celeba.preprocessing import preprocess

    start = time.perf_counter()
    stats = preprocess(args.subset_dir, args.output_dir, size=args.size, crop=args.crop, overwrite=args.overwrite,
                       progress=False if args.no_progress else None)
    print(f"wrote {', '.join(f'{s}.pt ({n})' for s, n in stats['counts'].items())} and stats.json to "
          f"{args.output_dir} in {time.perf_counter() - start:.1f}s")
    print(f"train mean {[round(m, 4) for m in stats['mean']]} std {[round(s, 4) for s in stats['std']]}")
    return 0


@_guard
def run_make_demo_archive(args: argparse.Namespace) -> int:
    from dpvision.celeba.demo import make_demo_archive

    start = time.perf_counter()
    info = make_demo_archive(args.out, args.n, args.seed, workers=args.workers, fmt=args.format,
                             nested=not args.flat, overwrite=args.overwrite)
    print(f"wrote {info['n']} images ({info['eyeglasses']} with eyeglasses; partitions {info['partitions']}) "
          f"to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


def add_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``celeba`` (with make-demo-archive, build-subset, preprocess) to a ``dpvision`` subparsers object.

    Example:
        >>> parser = argparse.ArgumentParser(prog="dpvision")
        >>> _ = add_subcommands(parser.add_subparsers(dest="command"))
        >>> args = parser.parse_args(["celeba", "make-demo-archive", "--out", "/tmp/x"])
        >>> args.n, args.func.__name__
        (2000, 'run_make_demo_archive')
    """
    celeba = subparsers.add_parser("celeba", help="CelebA Eyeglasses: demo archive, balanced subset, preprocessing, training")
    sub = celeba.add_subparsers(dest="celeba_command", required=True)
    add_demo_args(sub.add_parser("make-demo-archive", help="write a synthetic CelebA archive")).set_defaults(
        func=run_make_demo_archive)
    add_build_subset_args(sub.add_parser("build-subset", help="build a balanced (stratified) subset")).set_defaults(
        func=run_build_subset)
    add_preprocess_args(sub.add_parser("preprocess", help="crop, resize and save tensors + stats")).set_defaults(
        func=run_preprocess)
    celeba.subcommands = sub  # dpvision.cli adds `train` (a job, above this data package) here
    return celeba


def build_subset_main(argv: Sequence[str] | None = None) -> int:
    parser = add_build_subset_args(argparse.ArgumentParser(
        prog="celeba_build_subset.py", description="Build a balanced, stratified CelebA subset."))
    return run_build_subset(parser.parse_args(argv))


def preprocess_main(argv: Sequence[str] | None = None) -> int:
    parser = add_preprocess_args(argparse.ArgumentParser(
        prog="celeba_preprocess.py", description="Centre-crop, resize and save a CelebA subset as tensors."))
    return run_preprocess(parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpvision.celeba.cli <sub-command> ...`` (the same as ``dpvision celeba ...``)."""
    parser = argparse.ArgumentParser(prog="dpvision-celeba")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = parser.parse_args(["celeba", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The same benchmark at several commits, side by side in one run: find where a speed regression came in.

Two halves, because the GPU machine receives a copy of the working tree without ``.git``:

* ``prepare COMMIT...`` (here, in the repository): writes each commit's ``src/`` and ``benchmarks/`` under
  ``--into`` (default ``.carry/commits/<short sha>/``, ignored by git), by ``git archive``, so the trees travel
  with the device call (``carry: [".carry/commits"]``; about 1 MB a commit);
* ``run -- ARGS`` (there): runs ``benchmarks/bench_dpsgd.py ARGS`` of every prepared commit, oldest first, each
  in its own process importing that commit's ``dpvision``, each writing its JSON, then prints one table of
  ms per step, one column per commit. The commits run one after another on the same warm GPU; rerun the first
  at the end (``--again``) to see the drift of the machine itself.

Example (issue 23, session 10: the B = 256 WRN-16-4 bf16 DP step was 24.2 ms at every commit from the exact-clipping
change on, 19.4 ms after the fused ReLU -> GroupNorm; benchmarks/results/gpu_2026-12-07_s10/bisect.txt)::

    python benchmarks/bench_commits.py prepare 750b5b3 91cff49 e7a78df ea019ba e2145c7 a89f048 HEAD
    # on the device (carry .carry/commits):
    python benchmarks/bench_commits.py run --again --out bisect -- --device cuda --workloads wrn16_4,celeba64 \\
        --engines fast --wrn-engines plain,fast:precision=bf16 --max-steps 60 --warmup-steps 5 --epochs 3 \\
        --large-batch 0 --celeba-size 8192 --wrn-size 16384
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INTO = REPO / ".carry" / "commits"
ORDER = "order.txt"  # the prepared commits, oldest first, one short sha a line


class Refused(ValueError):
    """Bad input: one line on stderr, exit status 2."""


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def short_sha(commit: str) -> str:
    """The short sha of ``commit`` (any name git knows), or a one-line refusal."""
    try:
        return git("rev-parse", "--verify", "--quiet", "--short", f"{commit}^{{commit}}")
    except subprocess.CalledProcessError:
        raise Refused(f"prepare: {commit!r} is not a commit of {REPO} (a sha, a branch, a tag or HEAD~N)") from None


def prepare(commits: list[str], into: Path) -> list[str]:
    """Each commit's src/ and benchmarks/ under ``into/<short sha>``; returns the short shas, oldest first."""
    shas = list(dict.fromkeys(short_sha(c) for c in commits))
    # Oldest first: by commit time, then (commits of the same second) by their number of ancestors.
    shas.sort(key=lambda s: (int(git("show", "-s", "--format=%ct", s)), int(git("rev-list", "--count", s))))
    into.mkdir(parents=True, exist_ok=True)
    for sha in shas:
        folder = into / sha
        folder.mkdir(exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "src", "benchmarks"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    partial = into / (ORDER + ".tmp")  # written whole, then renamed: a reader never sees half a list
    partial.write_text("".join(f"{s}\n" for s in shas))
    partial.replace(into / ORDER)
    return shas


def prepared(into: Path) -> list[str]:
    """The prepared commits, oldest first, each with its tree, or a one-line refusal."""
    try:
        shas = (into / ORDER).read_text().split()
    except OSError:
        raise Refused(f"run: {into / ORDER} cannot be read; run 'bench_commits.py prepare COMMIT...' first "
                      "(here, in the repository) and carry its folder") from None
    if not shas:
        raise Refused(f"run: {into / ORDER} lists no commits; run prepare first")
    missing = [s for s in shas if not (into / s / "benchmarks" / "bench_dpsgd.py").is_file()]
    if missing:
        raise Refused(f"run: {into} lacks the trees of {', '.join(missing)}; run prepare again")
    return shas


def tree_env(tree: Path) -> dict:
    """The environment whose Python imports ``dpvision`` and the benchmarks' helpers from ``tree`` first."""
    paths = [str(tree / "src"), str(tree / "benchmarks"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run(into: Path, bench_args: list[str], again: bool, out: Path) -> list[tuple[str, dict]]:
    """Run every prepared commit's bench_dpsgd.py with ``bench_args``; (label, its JSON) per run. A commit whose
    benchmark fails gets an empty report (its column reads "failed"), and the others still run."""
    shas = prepared(into)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for i, sha in enumerate(shas + shas[:1] if again else shas):
        label = sha if i < len(shas) else f"{sha} again"
        tree = into / sha
        target = out / f"{label.replace(' ', '_')}.json"
        target.unlink(missing_ok=True)  # no stale report stands in for a failed run
        print(f"== {label}", flush=True)
        done = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_dpsgd.py"), *bench_args,
                               "--json", str(target)], env=tree_env(tree), cwd=REPO)
        if done.returncode != 0 or not target.is_file():
            print(f"== {label}: bench_dpsgd.py failed (exit status {done.returncode})", flush=True)
            reports.append((label, {"results": [], "failed": True}))
            continue
        reports.append((label, json.loads(target.read_text())))
    return reports


def table(reports: list[tuple[str, dict]]) -> str:
    """ms per step of every (workload, engine, DP) row, one column per commit run."""
    keys = list(dict.fromkeys((r["workload"], r["engine"], r["dp"]) for _, rep in reports for r in rep["results"]))
    ms = {(label, r["workload"], r["engine"], r["dp"]): r["ms_per_step"] for label, rep in reports
          for r in rep["results"]}
    lines = ["ms per step | " + " | ".join(label for label, _ in reports), "---|" * (len(reports) + 1)]
    for key in keys:
        cells = [f"{ms[(label, *key)]:.2f}" if (label, *key) in ms else "failed" if rep.get("failed") else "—"
                 for label, rep in reports]
        lines.append(f"{key[0]} {key[1]} {'DP' if key[2] else 'non-DP'} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_commits.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the commits' trees (here, in the repository)")
    p.add_argument("commits", nargs="+")
    p.add_argument("--into", type=Path, default=DEFAULT_INTO)
    r = sub.add_parser("run", help="run bench_dpsgd.py of every prepared commit (on the GPU machine)")
    r.add_argument("--into", type=Path, default=DEFAULT_INTO)
    r.add_argument("--out", type=Path, default=REPO / ".carry" / "bench_commits_out",
                   help="one JSON per commit run (default .carry/bench_commits_out, ignored by git)")
    r.add_argument("--again", action="store_true", help="run the oldest commit once more at the end")
    r.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then bench_dpsgd.py's arguments")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            print("prepared (oldest first): " + " ".join(prepare(args.commits, args.into)))
            return 0
        bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
        reports = run(args.into, bench_args, args.again, args.out)
        print(table(reports))
    except Refused as err:
        print(f"bench_commits.py: error: {err}", file=sys.stderr)
        return 2
    return 1 if any(rep.get("failed") for _, rep in reports) else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Regenerate the numbers that the README and docs quote, and check that the docs quote them.

Every number in a doc that comes from running the code stands between two markers,
invisible on GitHub::

    ... ends near ε ≈ <!-- numbers:mnist_default_epsilon -->2.02<!-- /numbers:mnist_default_epsilon --> ...

``docs/numbers.json`` holds the facts the spots are rendered from. Two kinds:

* cheap (a second): privacy accounting of the documented runs (the default ``python mnist.py``,
  and the CelebA demo runs' ε recomputed from their σ, q, steps and δ); recomputed on every check;
* expensive (CPU, tens of minutes): the CelebA pipeline on the 20,000-image demo archive, run
  through the documented command lines (``dpvision celeba make-demo-archive``,
  ``scripts/celeba_build_subset.py``, ``scripts/celeba_preprocess.py``, ``scripts/celeba_train.py``);
  recomputed only with ``--expensive``, otherwise taken from ``docs/numbers.json``.

Usage::

    python scripts/regenerate_doc_numbers.py                     # check: exit 1 naming every stale number
    python scripts/regenerate_doc_numbers.py --write             # rewrite docs/numbers.json and the docs
    python scripts/regenerate_doc_numbers.py --expensive --write # also re-run the CelebA demo (CPU, long)

``tests/test_doc_numbers.py`` runs the check.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from dpvision.runs import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
NUMBERS_JSON = REPO / "docs" / "numbers.json"
SPOT = re.compile(r"<!-- numbers:(?P<name>[a-z0-9_]+) -->(?P<body>.*?)<!-- /numbers:(?P=name) -->", re.S)
OPENING = re.compile(r"<!-- (/?)numbers:([a-z0-9_]+) -->")
REL_TOL = 1e-6  # recomputed floats vs docs/numbers.json (library versions may move the last digits)

# The documented runs' settings (README: `python mnist.py` defaults; CelebA: the table's runs).
MNIST_DEFAULT = {"k": 30_000, "batch_size": 256, "epochs": 30, "noise_multiplier": 1.3, "delta": 1e-5}
CELEBA_DEMO = {"n": 20_000, "seed": 0, "total": 20_000, "iod_bins": 4, "size": 64, "crop": 178, "epochs": 5}
CELEBA_RUNS = {  # name -> (mode, extra flags)
    "baseline": ("baseline", []),
    "dp": ("dp", []),
    "baseline_lr0.1": ("baseline", ["--lr", "0.1"]),
}
# Spots placed in docs that are not this script's author's to edit: the lead places them (then drop them here).
PENDING_PLACEMENT = {"mnist_default_epsilon", "mnist_default_epsilons"}


# ----------------------------------------------------------------------------------------------- facts
def mnist_default_facts() -> dict[str, Any]:
    """ε of the default ``python mnist.py`` run under every accountant (accounting only, no training)."""
    from dpvision.privacy.accounting import compute_epsilons, poisson_sample_rate, steps_per_epoch

    q = poisson_sample_rate(MNIST_DEFAULT["k"], MNIST_DEFAULT["batch_size"])
    steps = MNIST_DEFAULT["epochs"] * steps_per_epoch(q)
    epsilons = compute_epsilons([(MNIST_DEFAULT["noise_multiplier"], q, steps)], delta=MNIST_DEFAULT["delta"])
    return {**MNIST_DEFAULT, "sample_rate": q, "steps": steps, "epsilons": epsilons}


def recomputed_epsilons(run: dict[str, Any]) -> dict[str, float]:
    """ε under every accountant for a stored DP run's σ, q, steps and δ (cheap: no training)."""
    from dpvision.privacy.accounting import compute_epsilons

    return compute_epsilons([(run["noise_multiplier"], run["sample_rate"], run["steps"])], delta=run["delta"])


def _call(args: list[str], cwd: Path) -> None:
    print("$", " ".join(args), flush=True)
    result = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed with status {result.returncode}:\n{result.stdout[-4000:]}")


def celeba_commands(work: Path, python: str = sys.executable) -> list[list[str]]:
    """The documented command lines of the CelebA demo numbers, in order (the data pipeline, then training)."""
    demo, s = str(work), CELEBA_DEMO
    commands = [
        [python, "-m", "dpvision", "celeba", "make-demo-archive", "--out", f"{demo}/archive", "--n", str(s["n"]),
         "--seed", str(s["seed"])],
        [python, str(REPO / "scripts" / "celeba_build_subset.py"), "--archive-dir", f"{demo}/archive",
         "--attribute", "Eyeglasses", "--use-landmarks", "--stratify-by", "interocular", "--iod-bins",
         str(s["iod_bins"]), "--total", str(s["total"]), "--output-dir", f"{demo}/subset", "--link-mode", "symlink",
         "--no-progress"],
        [python, str(REPO / "scripts" / "celeba_preprocess.py"), "--subset-dir", f"{demo}/subset", "--output-dir",
         f"{demo}/preprocessed", "--size", str(s["size"]), "--crop", str(s["crop"])],
    ]
    for name, (mode, extra) in CELEBA_RUNS.items():
        commands.append([python, str(REPO / "scripts" / "celeba_train.py"), "--data", f"{demo}/preprocessed",
                         "--mode", mode, *extra, "--epochs", str(s["epochs"]), "--device", "cpu",
                         "--runs-dir", f"{demo}/runs", "--run-name", name, "--quiet"])
    return commands


def celeba_subset_facts(work: Path) -> dict[str, Any]:
    """Images per split and class of the demo subset (runs the first two commands: about half a minute)."""
    for args in celeba_commands(work)[:2]:
        _call(args, REPO)
    summary = json.loads((work / "subset" / "subset_summary.json").read_text())
    per_class = summary["balanced_available_per_class"]
    return {split: int(per_class[split]) for split in ("train", "val", "test")}


def _run_facts(summary: dict[str, Any]) -> dict[str, Any]:
    dp = bool(summary["dp"])
    facts = {key: summary[key] for key in ("test_accuracy", "test_accuracy_per_stratum", "test_count_per_stratum",
                                           "sample_rate", "steps", "num_train", "best_epoch")}
    facts.update(delta=summary["delta"], noise_multiplier=summary["noise_multiplier"] if dp else None,
                 epsilons=summary["epsilons"] if dp else None)
    return facts


def celeba_demo_facts(work: Path) -> dict[str, Any]:
    """The whole CelebA demo: subset counts, then the three training runs' summaries (CPU: long)."""
    per_class = celeba_subset_facts(work)
    for args in celeba_commands(work)[2:]:
        _call(args, REPO)
    runs = {}
    for name, (mode, _) in CELEBA_RUNS.items():
        summary = json.loads((work / "runs" / f"celeba_{mode}" / name / "summary.json").read_text())
        runs[name] = _run_facts(summary)
        versions = summary.get("versions")
    commands = [" ".join(a[1:]).replace(str(REPO) + "/", "").replace(str(work), "$WORK")
                for a in celeba_commands(work)]
    return {"settings": CELEBA_DEMO, "per_class": per_class, "runs": runs, "versions": versions,
            "commands": [f"python {c}" for c in commands]}


# ----------------------------------------------------------------------------------------------- rendering
def fmt_int(n: int) -> str:
    return f"{n:,}"


def fmt_delta(delta: float) -> str:
    """1.5625e-05 -> '1.56e-5'."""
    mantissa, exponent = f"{delta:.3g}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _bins(run: dict[str, Any]) -> str:
    per_bin = run["test_accuracy_per_stratum"]
    return " / ".join(f"{per_bin[b]:.3f}" for b in sorted(per_bin))


def render_celeba_table(facts: dict[str, Any]) -> str:
    base, dp = facts["runs"]["baseline"], facts["runs"]["dp"]
    eps = " / ".join(f"{dp['epsilons'][a]:.2f}" for a in ("rdp", "prv", "pld"))
    rows = [
        "| run | test acc. | ε (RDP / PRV / PLD) at δ = " + fmt_delta(dp["delta"]) + " | σ, q, steps "
        "| test acc. per interocular bin (small → large faces) |",
        "| --- | --- | --- | --- | --- |",
        f"| baseline (`--lr 0.05`) | {base['test_accuracy']:.3f} | ∞ | –, {base['sample_rate']:.4f}, "
        f"{base['steps']} | {_bins(base)} |",
        f"| DP-SGD (`--lr 0.1`, σ = 1, C = 1) | {dp['test_accuracy']:.3f} | {eps} | {float(dp['noise_multiplier'])}, "
        f"{dp['sample_rate']:.4f}, {dp['steps']} | {_bins(dp)} |",
    ]
    return "\n\n" + "\n".join(rows) + "\n\n"  # blank lines: the markers stay outside the table


def render_celeba_gaps(facts: dict[str, Any]) -> str:
    """'DP-SGD ends 0.4 points above the baseline overall but 4.4 points below it on the smallest faces'."""
    base, dp = facts["runs"]["baseline"], facts["runs"]["dp"]
    smallest = sorted(base["test_accuracy_per_stratum"])[0]

    def gap(b: float, d: float) -> str:
        points = round(100 * (d - b), 1)
        return "level with" if points == 0 else f"{abs(points):.1f} points {'above' if points > 0 else 'below'}"

    overall = gap(base["test_accuracy"], dp["test_accuracy"])
    small = gap(base["test_accuracy_per_stratum"][smallest], dp["test_accuracy_per_stratum"][smallest])
    return f"DP-SGD ends {overall} the baseline overall but {small} it on the smallest faces"


def render_mnist_epsilons(facts: dict[str, Any]) -> str:
    """docs/privacy.md's table: ε of the default ``python mnist.py`` run under each accountant."""
    labels = {"rdp": "RDP (Opacus)", "prv": "PRV (Opacus)", "pld": "PLD (dp_accounting)"}
    rows = ["| accountant | ε |", "| --- | --- |"]
    rows += [f"| {label} | {facts['epsilons'][name]:.4f} |" for name, label in labels.items()]
    return "\n\n" + "\n".join(rows) + "\n\n"


def render_baseline_lr01(facts: dict[str, Any]) -> str:
    """How the baseline does at DP's learning rate, next to its own default."""
    fast, slow = facts["runs"]["baseline_lr0.1"]["test_accuracy"], facts["runs"]["baseline"]["test_accuracy"]
    return (f"With `--lr 0.1`, DP's default, the baseline reaches {fast:.3f} in {facts['settings']['epochs']} "
            f"epochs ({'above' if fast > slow else 'below' if fast < slow else 'level with'} the {slow:.3f} of its "
            "default `--lr 0.05`)")


SPOTS: dict[str, Callable[[dict[str, Any]], str]] = {
    "mnist_default_epsilon": lambda n: f"{n['mnist_default']['epsilons']['rdp']:.2f}",
    "mnist_default_epsilons": lambda n: render_mnist_epsilons(n["mnist_default"]),
    "celeba_subset_per_class": lambda n: " / ".join(
        fmt_int(n["celeba_demo"]["per_class"][s]) for s in ("train", "val", "test")),
    "celeba_demo_images": lambda n: " / ".join(
        fmt_int(2 * n["celeba_demo"]["per_class"][s]) for s in ("train", "val", "test")),
    "celeba_demo_table": lambda n: render_celeba_table(n["celeba_demo"]),
    "celeba_demo_gaps": lambda n: render_celeba_gaps(n["celeba_demo"]),
    "celeba_baseline_lr01": lambda n: render_baseline_lr01(n["celeba_demo"]),
}


# ----------------------------------------------------------------------------------------------- docs
def doc_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def find_spots(text: str, where: str) -> list[tuple[str, str]]:
    """``[(name, body), ...]`` of the marked spots in ``text``; ``ValueError`` for a marker left unpaired."""
    spots = [(m["name"], m["body"]) for m in SPOT.finditer(text)]
    paired = SPOT.sub("", text)
    for stray in OPENING.finditer(paired):
        raise ValueError(f"{where}: marker {stray.group(0)} has no partner (write <!-- numbers:NAME -->...<!-- "
                         "/numbers:NAME -->)")
    for name, body in spots:
        if OPENING.search(body):
            raise ValueError(f"{where}: spot {name} holds another marker")
        if name not in SPOTS:
            raise ValueError(f"{where}: unknown spot {name!r} (known: {', '.join(sorted(SPOTS))})")
    return spots


def render(name: str, numbers: dict[str, Any]) -> str:
    """The text of spot ``name``; ``ValueError`` when docs/numbers.json lacks its facts."""
    try:
        return SPOTS[name](numbers)
    except (KeyError, TypeError) as err:
        raise ValueError(f"docs/numbers.json lacks the facts of spot {name} ({err!r}); run "
                         "python scripts/regenerate_doc_numbers.py --expensive --write") from None


def rewrite(text: str, numbers: dict[str, Any], where: str) -> str:
    """``text`` with every marked spot rendered anew from ``numbers``."""
    find_spots(text, where)
    return SPOT.sub(lambda m: f"<!-- numbers:{m['name']} -->{render(m['name'], numbers)}<!-- /numbers:{m['name']} -->",
                    text)


# ----------------------------------------------------------------------------------------------- check
def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=REL_TOL)
    return a == b


def cheap_problems(numbers: dict[str, Any]) -> list[str]:
    """The cheap numbers recomputed and compared with ``numbers`` (docs/numbers.json)."""
    problems = []
    fresh = mnist_default_facts()
    if not _close(fresh, numbers.get("mnist_default")):
        problems.append(f"mnist_default: recomputed {fresh}, docs/numbers.json has {numbers.get('mnist_default')}")
    dp = numbers.get("celeba_demo", {}).get("runs", {}).get("dp")
    if dp is not None and not _close(recomputed_epsilons(dp), dp["epsilons"]):
        problems.append(f"celeba_demo dp run: its σ, q, steps, δ give ε {recomputed_epsilons(dp)}, "
                        f"docs/numbers.json has {dp['epsilons']}")
    return problems


def doc_problems(numbers: dict[str, Any], root: Path = REPO) -> list[str]:
    """Spots whose text is not what ``numbers`` renders, and spots placed nowhere."""
    problems, placed = [], set()
    for path in doc_files(root):
        if not path.exists():
            continue
        where = str(path.relative_to(root))
        text = path.read_text(encoding="utf-8")
        try:
            spots = find_spots(text, where)
        except ValueError as err:
            problems.append(str(err))
            continue
        for name, body in spots:
            placed.add(name)
            try:
                expected = render(name, numbers)
            except ValueError as err:
                problems.append(f"{where}: {err}")
                continue
            if body != expected:
                problems.append(f"{where}: spot {name} says {body.strip()!r}, the numbers give {expected.strip()!r}")
    for name in sorted(set(SPOTS) - placed - PENDING_PLACEMENT):
        problems.append(f"spot {name} is placed in no doc (README.md, docs/*.md)")
    return problems


def load_numbers() -> dict[str, Any]:
    return json.loads(NUMBERS_JSON.read_text(encoding="utf-8")) if NUMBERS_JSON.exists() else {}


def write_numbers(numbers: dict[str, Any]) -> None:
    atomic_write_text(NUMBERS_JSON, json.dumps(numbers, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite docs/numbers.json and the marked spots")
    parser.add_argument("--expensive", action="store_true",
                        help="also re-run the CelebA demo pipeline and its three trainings (CPU, long)")
    parser.add_argument("--work-dir", default=None, help="folder for the CelebA demo (default: a temporary one)")
    args = parser.parse_args(argv)
    numbers = load_numbers()
    if args.expensive:
        with tempfile.TemporaryDirectory(prefix="doc_numbers_") as tmp:
            work = Path(args.work_dir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            numbers["celeba_demo"] = celeba_demo_facts(work)
    if args.write:
        numbers["mnist_default"] = mnist_default_facts()
        problems = cheap_problems(numbers)  # only a DP run whose stored ε disagrees with its own settings
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        try:  # every doc rendered before anything is written
            texts = {path: path.read_text(encoding="utf-8") for path in doc_files() if path.exists()}
            new_texts = {path: rewrite(text, numbers, str(path.relative_to(REPO))) for path, text in texts.items()}
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        write_numbers(numbers)
        for path, new in new_texts.items():
            if new != texts[path]:
                atomic_write_text(path, new)
                print("rewrote", path.relative_to(REPO))
        return 0
    problems = cheap_problems(numbers) + doc_problems(numbers)
    for problem in problems:
        print("stale:", problem, file=sys.stderr)
    if problems:
        print("run: python scripts/regenerate_doc_numbers.py --write (--expensive for the CelebA demo)",
              file=sys.stderr)
        return 1
    print(f"all {len(SPOTS)} numbers up to date ({len(PENDING_PLACEMENT)} not yet placed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The tables ``benchmarks/accuracy.py --write-docs`` puts into ``docs/accuracy.md``, from the phases' JSON.

Each table sits between ``<!-- accuracy:NAME -->`` and ``<!-- /accuracy:NAME -->``; MNIST's markers have no
prefix (``tune``, ``frontier``, ...), the other datasets' carry it (``fashion-mnist:tune``, ``cifar10:frontier``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from accuracy_plan import REPO, Profile

DOCS = REPO / "docs" / "accuracy.md"
PHASES = ("tune", "frontier", "ablation")
MAX_SECONDS_PER_POINT = 120.0  # issue 9's target: an ε point trains in at most 2 minutes on one H100


def marked(text: str, name: str, body: str) -> str:
    """``text`` with the part between ``<!-- accuracy:NAME -->`` and ``<!-- /accuracy:NAME -->`` replaced."""
    start, end = f"<!-- accuracy:{name} -->", f"<!-- /accuracy:{name} -->"
    if start not in text or end not in text:
        raise ValueError(f"--docs: no {start} ... {end} markers to fill")
    head, rest = text.split(start, 1)
    return head + start + "\n" + body.rstrip("\n") + "\n" + end + rest.split(end, 1)[1]


def write_docs(args, profile: Profile) -> None:
    """Fill the docs' marked tables of ``profile``'s dataset from the phases' JSON files under ``--out``."""
    from dpvision.runs import atomic_write_bytes, atomic_write_text

    found = {p: json.loads((args.out / f"{p}.json").read_text()) for p in PHASES if (args.out / f"{p}.json").is_file()}
    if not found:
        raise ValueError(f"--write-docs: no tune.json, frontier.json or ablation.json in {args.out}")
    if any(r["smoke"] for r in found.values()) and Path(args.docs).resolve() == DOCS.resolve():
        raise ValueError(f"--write-docs: {args.out} holds --smoke results; give --docs OTHER.md to see them")
    text = Path(args.docs).read_text(encoding="utf-8")
    prefix = profile.docs_prefix
    commands = list(dict.fromkeys(r["command"] for r in found.values()))  # --phase all: one command, three files
    text = marked(text, prefix + "commands", "```\n" + "\n".join(commands) + "\n```\n"
                  + "Device: " + "; ".join(sorted({r["device"] for r in found.values()})) + ".")
    if "tune" in found:
        text = marked(text, prefix + "tune", tune_table(found["tune"]))
    if "frontier" in found:
        picture = Path(args.docs).with_name(Path(args.docs).stem + "_" + prefix.replace(":", "_") + "frontier.png")
        atomic_write_bytes(picture, (args.out / "frontier.png").read_bytes())
        text = marked(text, prefix + "frontier",
                      frontier_table(found["frontier"]) + f"\n![privacy-utility frontier]({picture.name})\n")
        text = marked(text, prefix + "targets", targets_table(found["frontier"], profile.targets))
    if "ablation" in found:
        text = marked(text, prefix + "ablation", ablation_table(found["ablation"]))
    atomic_write_text(args.docs, text)
    print(f"wrote {args.docs}")


def tune_table(tune: dict) -> str:
    lines = [f"Search space: {tune['search_space_size']} combinations ({tune['grid_file']}); "
             f"{tune['selection']}.", "",
             *([f"Budget: {tune['budget_seconds']:g} estimated H100 seconds; {len(tune['dropped_by_budget'])} "
                "candidates did not fit and were not trained (not counted as tried).", ""]
               if tune.get("budget_seconds") else []),
             "| target ε | configurations tried | best validation accuracy | chosen recipe |",
             "|---|---|---|---|"]
    lines += [f"| {e} | {tune['configs_tried'][e]} | {100 * b['val_accuracy']:.2f}% | `{b['recipe']}` |"
              for e, b in tune["best"].items()]
    return "\n".join(lines) + "\n"


def frontier_table(frontier: dict) -> str:
    lines = ["| recipe | target ε | test accuracy (mean ± sd) | seeds | ε RDP / PRV / PLD (max over seeds) | "
             "seconds per run (mean, max) |", "|---|---|---|---|---|---|"]
    for p in frontier["points"]:
        eps = "∞ (no DP)" if p["target_epsilon"] in ("inf", math.inf) else f"{float(p['target_epsilon']):g}"
        privacy = "—" if eps[0] == "∞" else " / ".join(f"{float(p[f'epsilon_{a}']):.3f}"
                                                        for a in ("rdp", "prv", "pld"))
        lines.append(f"| {p['recipe']} | {eps} | {100 * p['mean']:.2f}% ± {100 * p['sd']:.2f} | {p['n']} | {privacy} "
                     f"| {p['seconds_mean']:.1f}, {p['seconds_max']:.1f} |")
    def source(part: dict) -> str:
        if not part.get("tuned_at"):
            return ""
        tuned = " and ".join(f"{e:g}" for e in part["tuned_at"])
        return f" (best on validation at ε = {tuned}; used at ε = {', '.join(f'{e:g}' for e in part['epsilons'])})"

    lines += ["", "Recipes: " + "; ".join(f"{p['label']}{source(p)}: `{p['recipe']}`" for p in frontier["sweeps"])]
    return "\n".join(lines) + "\n"


def targets_table(frontier: dict, targets: dict[float, float]) -> str:
    tuned = {float(p["target_epsilon"]): p for p in frontier["points"] if p["recipe"] == "tuned"}
    lines = ["| target | measured | met |", "|---|---|---|"]
    for epsilon, goal in targets.items():
        p = tuned.get(epsilon)
        got = f"{100 * p['mean']:.2f}% (n = {p['n']})" if p else "not measured"
        met = "yes" if p and p["mean"] >= goal else "no"
        lines.append(f"| ≥ {100 * goal:.1f}% at ε = {epsilon:g} | {got} | {met} |")
    private = [p for p in frontier["points"] if p["recipe"] == "tuned" and p["target_epsilon"] not in ("inf", math.inf)]
    slowest = max((p["seconds_max"] for p in private), default=math.nan)
    lines.append(f"| ≤ {MAX_SECONDS_PER_POINT:.0f} s per ε point (one run) | {slowest:.1f} s (slowest run) | "
                 f"{'yes' if slowest <= MAX_SECONDS_PER_POINT else 'no'} |")
    return "\n".join(lines) + "\n"


def ablation_table(ablation: dict) -> str:
    n = len(ablation["seeds"])
    lines = [f"At ε = {ablation['epsilon']:g}, {n} seed{'s' if n > 1 else ''}; full recipe: `{ablation['recipe']}`.",
             "", "| variant | change | test accuracy (mean ± sd) | Δ vs full |", "|---|---|---|---|"]
    for r in ablation["variants"]:
        if "mean" in r:
            lines.append(f"| {r['variant']} | {r['change'] or '—'} | {100 * r['mean']:.2f}% ± {100 * r['sd']:.2f} | "
                         f"{100 * r['delta_vs_full']:+.2f} |")
        else:
            lines.append(f"| {r['variant']} | — | not run: {r['skipped']} | |")
    return "\n".join(lines) + "\n"



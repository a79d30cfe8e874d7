"""A sweep's outputs: ``results.csv``, ``frontier.png`` (accuracy against ε) and ``report.md``.

Example:
    >>> rows = [{"target_epsilon": 1.0, "value": "", "test_accuracy": 0.9}, {"target_epsilon": 1.0, "value": "",
    ...          "test_accuracy": 0.8}]
    >>> {k: (round(m, 3), round(s, 3), n) for k, (m, s, n) in aggregate(rows).items()}
    {('', 1.0): (0.85, 0.071, 2)}
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Sequence

import yaml

RESULT_COLUMNS = ["name", "target_epsilon", "seed", "vary", "value", "test_accuracy", "epsilon", "epsilon_rdp",
                  "epsilon_prv", "epsilon_pld", "delta", "noise_multiplier", "steps", "wall_seconds", "run_dir"]
PAPERS = ("Papernot & Steinke, \"Hyperparameter Tuning with Renyi Differential Privacy\", ICLR 2022")


def aggregate(rows: Sequence[dict]) -> dict[tuple, tuple[float, float, int]]:
    """``{(value, target ε): (mean, sample sd, n)}`` of test accuracy over seeds."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["value"], row["target_epsilon"]), []).append(float(row["test_accuracy"]))
    return {key: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for key, v in groups.items()}


def frontier_figure(rows: Sequence[dict], *, vary: str | None):
    """Test accuracy against ε (log scale): mean with min-max bars over seeds; baseline as a band."""
    from matplotlib.figure import Figure

    from dpvision.jobs.plots import legend_outside

    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    stats = aggregate(rows)
    values = sorted({key[0] for key in stats}, key=str)
    for value in values:
        points = sorted((eps, key) for key in stats if key[0] == value and math.isfinite(eps := key[1]))
        color = "gray" if not vary else None  # with --vary: the baseline takes its curve's colour
        if points:
            eps = [p[0] for p in points]
            accs = [[float(r["test_accuracy"]) for r in rows if (r["value"], r["target_epsilon"]) == key]
                    for _, key in points]
            means = [statistics.fmean(a) for a in accs]
            err = [[m - min(a) for m, a in zip(means, accs)], [max(a) - m for m, a in zip(means, accs)]]
            label = f"{vary} = {value}" if vary else "DP-SGD"
            bars = ax.errorbar(eps, means, yerr=err, marker="o", capsize=3, label=f"{label} (mean, min-max over seeds)")
            color = color or bars.lines[0].get_color()
        base = stats.get((value, math.inf))
        if base is not None:
            line = ax.axhline(base[0], linestyle="--", color=color,
                              label=f"no DP{f' ({vary} = {value})' if vary else ''}: {base[0]:.4f}")
            if base[1] > 0:
                ax.axhspan(base[0] - base[1], base[0] + base[1], alpha=0.15, color=line.get_color())
    ax.set_xscale("log")
    ticks = sorted({key[1] for key in stats if math.isfinite(key[1])})
    if ticks:  # the ε values themselves, not 2 x 10^0
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ε (target; δ as in the recipe)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3, which="both")
    legend_outside(ax, where="below", ncol=1, fontsize=8)  # under the axes: it never hides a point
    ax.set_title("privacy-utility frontier")
    return fig


def write_outputs(out: Path, rows: Sequence[dict], *, points: Sequence[dict], vary, command: str) -> None:
    """(Re)write the three outputs from the rows so far, each atomically."""
    import io

    from dpvision.runs import atomic_write_bytes, atomic_write_text, csv_text

    atomic_write_text(out / "results.csv", csv_text(RESULT_COLUMNS, rows))
    buffer = io.BytesIO()
    frontier_figure(rows, vary=vary[0] if vary else None).savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(out / "frontier.png", buffer.getvalue())
    atomic_write_text(out / "report.md", report_text(rows, points=points, vary=vary, command=command))


def report_text(rows: Sequence[dict], *, points: Sequence[dict], vary, command: str) -> str:
    stats = aggregate(rows)
    lines = ["# Privacy-utility sweep", "", f"Command: `{command}`", "",
             f"{len(rows)} of {len(points)} planned runs finished. Test accuracy, mean ± sd over seeds:", "",
             f"| {vary[0] if vary else 'recipe'} | target ε | test accuracy | seeds |", "|---|---|---|---|"]
    for (value, eps), (mean, sd, n) in sorted(stats.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        label = value if vary else "as given"
        spread = f" ± {sd:.4f}" if n > 1 else " (one seed: no spread)"
        lines.append(f"| {label} | {'∞ (no DP)' if math.isinf(eps) else f'{eps:g}'} | {mean:.4f}{spread} | {n} |")
    lines += ["", "Each run's ε (RDP, PRV, PLD) is in `results.csv`; it is at most its target (σ is calibrated "
              "with the recipe's accountant).",
              "", test_set_sentence(rows) + " The test set is there to report, not to choose: choose "
              "hyperparameters on a validation split (`data.val_size`). Tuning on private "
              f"data has a privacy cost of its own ({PAPERS}).", ""]
    return "\n".join(lines)


SELECTED = {"last": "the last epoch's weights", "best_val": "the weights of the best validation epoch"}


def test_set_sentence(rows: Sequence[dict]) -> str:
    """What the runs did with the test set, read from each run's ``config.yaml`` (the settings that ran)."""
    seen = set()
    for row in rows:
        try:
            run = yaml.safe_load((Path(row["run_dir"]) / "config.yaml").read_text(encoding="utf-8"))["run"]
            seen.add((bool(run.get("evaluate_test", True)), bool(run.get("test_every_epoch", True)),
                      str(run.get("select", "last"))))
        except (OSError, KeyError, TypeError, yaml.YAMLError):
            seen.add(None)
    if len(seen) != 1 or None in seen:
        return ("How each run used the test set is in its `config.yaml` (`run.evaluate_test`, "
                "`run.test_every_epoch`, `run.select`).")
    evaluate, every_epoch, select = seen.pop()
    if not evaluate:
        return "No run looked at the test set (`run.evaluate_test: false`): the accuracies are validation accuracies."
    kept = SELECTED.get(select, f"the weights `run.select: {select}` kept")
    if every_epoch:
        return ("Every run evaluated the test set after every epoch (`run.test_every_epoch: true`: the test columns "
                f"of its `metrics.csv`); the accuracy above is that of {kept}.")
    return (f"Each run evaluated the test set once, at the end, on {kept} (`run.test_every_epoch: false`).")

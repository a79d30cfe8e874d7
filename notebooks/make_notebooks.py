"""Write the two tutorial notebooks (without outputs) with nbformat: ``python notebooks/make_notebooks.py``.

Edit the cells here, not in the .ipynb files, then re-run this script. Both
notebooks read two environment variables:

* ``DPVISION_NOTEBOOK_DIR``: working folder for archives, subsets and runs
  (default: a new temporary folder; nothing is ever written into the repository);
* ``DPVISION_NOTEBOOK_SMALL=1``: tiny sizes (500 images, 32x32, 2 epochs) so that
  ``tests/test_notebooks.py`` runs each notebook in well under 90 s on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = '''\
import os, tempfile
from pathlib import Path

SMALL = os.environ.get("DPVISION_NOTEBOOK_SMALL", "0") == "1"  # tiny sizes for the automated test
WORK = Path(os.environ.get("DPVISION_NOTEBOOK_DIR") or tempfile.mkdtemp(prefix="dpvision_")) / "{name}"
WORK.mkdir(parents=True, exist_ok=True)
{sizes}
print(f"working folder: {{WORK}}  (small mode: {{SMALL}})")
'''


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


def notebook_01():
    cells = [
        md("""
# 1 · Data: a balanced, stratified *Eyeglasses* subset and its preprocessing

This notebook walks through the data half of the project on a **synthetic demo archive** that has exactly
the layout of the Kaggle CelebA download (same tables, same file names), so it runs anywhere in a few minutes.
On the real data only the path changes.

We will:

1. generate a demo archive and look at its raw statistics (how rare are eyeglasses? how large are the faces?);
2. build a **balanced** subset (as many images *with* as *without* eyeglasses in every split) that is also
   **stratified** by the interocular distance (the distance between the eyes, a proxy for face size);
3. preprocess it (centre crop, resize, per-channel statistics) into the tensors that training reads;
4. look at the images, per class and per stratum.

> Set `DPVISION_NOTEBOOK_DIR` to choose where files go (default: a fresh temporary folder) and
> `DPVISION_NOTEBOOK_SMALL=1` for a tiny, fast version (used by the automated tests).
"""),
        code(SETUP.format(name="nb01", sizes=(
            'N_IMAGES = 500 if SMALL else 4000   # images in the demo archive\n'
            'SIZE = 32 if SMALL else 64          # side length after preprocessing'))),
        code('''
%matplotlib inline
import csv, json
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np

from dpvision.celeba import build_subset, load_split, make_demo_archive, preprocess, read_archive
from dpvision.jobs.plots import class_colors, legend_outside
'''),
        md("""
## 1. A demo archive

`make_demo_archive` draws cartoon faces from their own landmarks: when `Eyeglasses` is 1 the frames are drawn
around the eyes. About 20% of the faces wear glasses (real CelebA: about 6.5%), and partitions are CelebA's
80/10/10 train/validation/test split.
"""),
        code('''
archive_dir = WORK / "archive"
if not archive_dir.exists():
    info = make_demo_archive(archive_dir, n=N_IMAGES, seed=0)
    print(info)
archive = read_archive(archive_dir, need_landmarks=True)
print(len(archive), "images; tables read:", sorted(archive.files))
'''),
        md("""
### Raw statistics

The target is imbalanced, and it is imbalanced *differently* in subgroups (here: more men than women wear
glasses). A classifier trained on raw data could learn "man → glasses". The interocular distance (in pixels,
from the landmark table) measures how large the face is in the image.
"""),
        code('''
glasses = archive.attribute("Eyeglasses") > 0          # bool [N]
male = archive.attribute("Male") > 0
iod = archive.interocular()                             # float [N], pixels
split_names = ["train", "val", "test"]
for code_, name in enumerate(split_names):
    part = archive.partitions == code_
    print(f"{name:5s}: {part.sum():5d} images, {glasses[part].mean():6.1%} with eyeglasses")
print(f"eyeglasses among men {glasses[male].mean():.1%}, among women {glasses[~male].mean():.1%}")
print(f"interocular distance: {iod.min():.1f} .. {iod.max():.1f} px (median {np.median(iod):.1f})")
'''),
        md("""
## 2. A balanced subset, stratified by interocular distance

`build_subset` keeps CelebA's official partitions and, **inside every split and every stratum**, takes the same
number of images from both classes. The strata here are 4 quantile bins of the interocular distance computed on
the train partition: after stratification, small and large faces are equally common in both classes, so face size
can no longer predict the label.

A dry run prints the plan without writing anything:
"""),
        code('''
subset_dir = WORK / "subset"
plan = build_subset(archive_dir, subset_dir, use_landmarks=True, stratify_by=["interocular"], iod_bins=4,
                    dry_run=True, progress=False, warn=lambda m: print("note:", m))
print("per-class counts per split:", {s: plan["totals"][s] for s in split_names})
print("interocular bin edges (px):", [round(e, 1) for e in plan["iod_bin_edges"]])
'''),
        code('''
if not subset_dir.exists():
    summary = build_subset(archive_dir, subset_dir, use_landmarks=True, stratify_by=["interocular"], iod_bins=4,
                           link_mode="symlink", progress=False, warn=lambda m: print("note:", m))
with open(subset_dir / "subset_index.csv", newline="") as f:
    index = list(csv.DictReader(f))
print(len(index), "images in the subset; columns:", list(index[0]))
'''),
        md("""
### Statistics of the subset

Every (split, stratum) cell has the same count for both classes: that is what *balanced within strata* means.
"""),
        code('''
counts = Counter((r["split"], r["stratum"], r["class_name"]) for r in index)
strata = sorted({r["stratum"] for r in index})
classes = sorted({r["class_name"] for r in index})
print(f"{'split':6s} {'stratum':10s} " + " ".join(f"{c:>14s}" for c in classes))
for s in split_names:
    for st in strata:
        print(f"{s:6s} {st:10s} " + " ".join(f"{counts[(s, st, c)]:14d}" for c in classes))
'''),
        md("""
### Interocular distance per class: before and after

Left: the raw archive. Right: the training split of the subset. After stratification the two histograms have the
same shape (up to the width of the bins), so the model cannot use face size as a shortcut. Each class keeps its
colour in both panels.
"""),
        code('''
train_rows = [r for r in index if r["split"] == "train"]
raw = {"eyeglasses": iod[glasses], "no_eyeglasses": iod[~glasses]}  # the archive, under the subset's class names
assert set(raw) == set(classes), classes
subset = {c: [float(r["interocular_distance"]) for r in train_rows if r["class_name"] == c] for c in classes}
colors = [class_colors(classes)[c] for c in classes]  # one colour per class, the same in both panels
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4), sharex=True, layout="constrained")
bins = np.linspace(iod.min(), iod.max(), 21)
ax0.hist([raw[c] for c in classes], bins=bins, density=True, label=classes, color=colors)
ax0.set_title("raw archive (density)")
ax1.hist([subset[c] for c in classes], bins=bins, label=classes, color=colors)
for edge in plan["iod_bin_edges"]:
    ax1.axvline(edge, color="k", lw=0.8, ls="--")
ax1.set_title("subset, train split (counts; dashed: bin edges)")
for ax in (ax0, ax1):
    ax.set_xlabel("interocular distance (px)")
    legend_outside(ax, where="below", ncol=2, fontsize=8)
plt.show()
'''),
        md("""
## 3. Preprocessing

Each image is centre-cropped to 178×178 (the full width of an aligned CelebA image) and resized with an
antialiasing filter. The result is one uint8 tensor file per split plus `stats.json` with the per-channel mean
and standard deviation **of the training split**. It describes the data to people; training never reads it: every
run normalises with the fixed (x − 0.5) / 0.5 per channel, because statistics of the private training set would be
a release outside ε (`docs/privacy.md` explains why).
"""),
        code('''
pre_dir = WORK / f"preprocessed_{SIZE}"
if not pre_dir.exists():
    stats = preprocess(subset_dir, pre_dir, size=SIZE, progress=False)
stats = json.loads((pre_dir / "stats.json").read_text())
print("counts:", stats["counts"])
print("train mean:", [round(m, 3) for m in stats["mean"]], "std:", [round(s, 3) for s in stats["std"]])
train, meta = load_split(pre_dir, "train")
print("train images:", tuple(train.images.shape), train.images.dtype, "labels:", Counter(train.labels.tolist()))
'''),
        md("""
## 4. What the model will see: samples per class and stratum

Rows are classes, columns interocular-distance bins (small faces on the left, large on the right).
"""),
        code('''
per_cell = 2 if SMALL else 3
class_names = meta["class_names"]
fig, axes = plt.subplots(len(class_names), len(strata) * per_cell,
                         figsize=(1.3 * len(strata) * per_cell, 1.5 * len(class_names)))
for row, name in enumerate(class_names):
    for col, st in enumerate(strata):
        idx = [i for i, (y, s) in enumerate(zip(train.labels.tolist(), meta["strata"])) if y == row and s == st]
        for k in range(per_cell):
            ax = axes[row, col * per_cell + k]
            ax.axis("off")
            if k < len(idx):
                ax.imshow(train.images[idx[k]].permute(1, 2, 0).numpy())
            if k == 0:
                ax.set_title(f"{name}\\n{st}", fontsize=7)
fig.tight_layout()
plt.show()
'''),
        md("""
## Takeaways

* A **balanced** subset makes accuracy meaningful (50% is chance) and a **stratified** one removes a confounder
  (face size) that the classifier could otherwise exploit.
* Splits are CelebA's own: no image moves between train, validation and test.
* `stats.json` describes the training split, but training normalises with the fixed (x − 0.5) / 0.5 and never
  reads it (`docs/privacy.md` explains why).

Next: `02_training_baseline_vs_dp.ipynb` trains the same CNN with and without differential privacy on this kind of
preprocessed folder. From the command line the same chain is
`scripts/celeba_build_subset.py` → `scripts/celeba_preprocess.py` → `scripts/celeba_train.py`.
"""),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def notebook_02():
    cells = [
        md("""
# 2 · Training: non-private baseline vs DP-SGD

We train the same small CNN (`CelebaCNN`: four conv blocks with **GroupNorm**, no BatchNorm, because BatchNorm mixes
the examples of a batch and breaks per-example privacy) twice on the same data:

* **baseline**: ordinary SGD on shuffled batches;
* **DP-SGD**: every step samples each training image independently with probability *q* (Poisson sampling),
  clips each image's gradient to norm at most *C*, adds Gaussian noise of standard deviation *σ·C* to the sum,
  and a privacy accountant turns (σ, q, number of steps, δ) into the guarantee ε.

Both go through the one training job, `dpvision.jobs.run`, with the configuration `scripts/celeba_train.py --mode
baseline|dp` builds (the recipe `recipes/celeba_seed.yaml`).

> `DPVISION_NOTEBOOK_DIR` chooses the working folder (default: a fresh temporary one);
> `DPVISION_NOTEBOOK_SMALL=1` shrinks everything (500 images, 32×32, 2 epochs) for the automated tests. With tiny
> sizes the numbers are noisy: run without it to see the lessons clearly.
"""),
        code(SETUP.format(name="nb02", sizes=(
            'N_IMAGES = 500 if SMALL else 6000   # demo archive size (~1,900 training images after balancing)\n'
            'SIZE = 32 if SMALL else 64\n'
            'EPOCHS = 2 if SMALL else 10\n'
            'BATCH = 32 if SMALL else 128'))),
        code('''
%matplotlib inline
import csv, json

import matplotlib.pyplot as plt

from dpvision.celeba import build_subset, make_demo_archive, preprocess
from dpvision.jobs import TrainConfig, run
from dpvision.jobs.plots import curves_figure, legend_outside, plot_group_accuracy
from dpvision.privacy.accounting import compute_epsilon, poisson_sample_rate, steps_per_epoch
'''),
        md("""
## Data

The same chain as notebook 1, in one cell: a demo archive, a balanced subset stratified by interocular distance
(4 bins), preprocessed tensors.
"""),
        code('''
archive_dir, subset_dir, pre_dir = WORK / "archive", WORK / "subset", WORK / f"preprocessed_{SIZE}"
if not archive_dir.exists():
    make_demo_archive(archive_dir, n=N_IMAGES, seed=0)
if not subset_dir.exists():
    build_subset(archive_dir, subset_dir, use_landmarks=True, stratify_by=["interocular"], iod_bins=4,
                 link_mode="symlink", progress=False, warn=lambda m: None)
if not pre_dir.exists():
    preprocess(subset_dir, pre_dir, size=SIZE, progress=False)
stats = json.loads((pre_dir / "stats.json").read_text())
N_TRAIN = stats["counts"]["train"]
print("images per split:", stats["counts"])
'''),
        md("""
### Why the DP run does not use `stats.json`

`stats.json` holds the per-channel mean and standard deviation of the **training** images. They are numbers
computed from the private training set: normalising with them would build them into every model the run produces,
a release that no accountant counts (on a small training set, adding or removing one face visibly moves them). So
every dpvision run normalises CelebA with fixed constants, (x − 0.5) / 0.5 per channel, which maps pixels to
[−1, 1] without looking at any image. The baseline does the same, so the comparison below differs in DP-SGD
alone. `stats.json` is still written, to describe the data to people: treat it as private as the images.
"""),
        md("""
## Baseline and DP-SGD, same settings

The configuration is one typed config with five sections (the same as a YAML recipe); the baseline is the same
config with DP switched off (`config.deactivated()`) and the smaller learning rate of the baseline. For DP we ask
for a target ε and let the accountant **calibrate σ** so that the whole run ends exactly there. δ is `"auto"`:
1/(10·N), well below 1/N (a δ near 1/N would allow "leak one person's data entirely" with non-negligible
probability). The test set judges the weights of the best validation epoch (`select: best_val`).
"""),
        code('''
config = TrainConfig.from_dict({
    "data": {"dataset": "celeba", "root": str(pre_dir)},
    "model": {"name": "celeba_cnn", "width": 16},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "epochs": EPOCHS, "batch_size": BATCH},
    "dp": {"target_epsilon": 8.0, "max_grad_norm": 1.0, "delta": "auto"},
    "run": {"select": "best_val", "test_every_epoch": False, "runs_dir": str(WORK / "runs"), "quiet": True},
})
baseline_config = config.deactivated().with_overrides({"optim.lr": 0.05})
baseline = run(baseline_config, group="celeba_baseline", run_name="baseline")
dp = run(config, group="celeba_dp", run_name="dp_eps8")
print(f"{'run':9s} {'test acc':>8s} {'epsilon':>8s} {'sigma':>6s} {'q':>7s} {'steps':>5s}")
for name, s in (("baseline", baseline), ("DP-SGD", dp)):
    sigma = s["noise_multiplier"] or 0.0  # the baseline adds no noise
    print(f"{name:9s} {s['test_accuracy']:8.3f} {s['epsilon']:8.3f} {sigma:6.3f} {s['sample_rate']:7.4f} "
          f"{s['steps']:5d}   ({s['seconds_per_epoch']:.1f} s/epoch)")
'''),
        md("""
### Curves

Left of each figure: accuracy per epoch (the training curve is measured on the training steps themselves: under
DP, on the noisy, clipped steps; the legend says which).
Right: ε spent so far. It grows with every step, roughly like the square root of the number of steps; RDP, PRV and
PLD are three accountants bounding the *same* mechanism, PRV and PLD more tightly.
"""),
        code('''
def metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))

for name, s in (("baseline", baseline), ("DP-SGD", dp)):
    display(curves_figure(metrics(s["run_dir"]), title=name))  # the figure of the run's curves.png
'''),
        md("""
## Accuracy per stratum

DP-SGD's clipping and noise do not cost every group the same. Groups that are harder or rarer contribute gradients
that the clipped, noisy average represents less well, so DP's accuracy drop is often **uneven** across subgroups
(here: interocular-distance bins, i.e. small vs large faces). Compare the gap per bin, not only the overall gap.
With tiny test sets (small mode) a bin holds only a handful of images: read the counts before the bars.
"""),
        code('''
# summary.json: test accuracy per group (here the interocular strata of the subset) and per class, with counts
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), layout="constrained")  # legends beside the bars, not on them
plot_group_accuracy({"baseline": baseline["test_accuracy_per_group"], "DP-SGD": dp["test_accuracy_per_group"]},
                    ax=axes[0], title="test accuracy per interocular bin", counts=dp["test_count_per_group"])
plot_group_accuracy({"baseline": baseline["test_accuracy_per_class"], "DP-SGD": dp["test_accuracy_per_class"]},
                    ax=axes[1], title="test accuracy per class", counts=dp["test_count_per_class"])
plt.show()
for st in sorted(dp["test_accuracy_per_group"]):
    gap = baseline["test_accuracy_per_group"][st] - dp["test_accuracy_per_group"][st]
    print(f"{st}: baseline - DP = {gap:+.3f}  (n = {dp['test_count_per_group'][st]})")
'''),
        md("""
## What σ, C, q and δ do

* **σ (noise multiplier)**: the noise std is σ·C. More noise → smaller ε (more privacy), noisier training.
* **C (clipping norm)**: bounds each example's influence. It does **not** enter ε (the noise scales with it), but it
  changes learning: too small loses signal, too large adds relatively more noise to the useful gradient.
* **q (sample rate)** = expected batch / N. Each example takes part in a step only with probability q; this
  *privacy amplification by subsampling* is why small q is cheap. But an epoch is 1/q steps, so for a fixed number of
  epochs smaller batches mean more steps.
* **δ**: the probability with which the ε guarantee may fail. Take δ ≪ 1/N.

The table below is pure accounting (no training): ε after a fixed number of **epochs** for several σ and q.
"""),
        code('''
delta = 1 / (10 * N_TRAIN)
epochs = 10
sigmas = [0.6, 0.8, 1.0, 1.5, 2.0, 3.0]
rates = [0.01, 0.04, 0.16]
print(f"epsilon after {epochs} epochs (RDP accountant, delta = {delta:.2g})")
print("sigma  " + "".join(f"   q={q:<6g}" for q in rates))
table = {}
for sigma in sigmas:
    row = [compute_epsilon([(sigma, q, epochs * steps_per_epoch(q))], delta=delta) for q in rates]
    table[sigma] = row
    print(f"{sigma:5.1f}  " + "".join(f"{e:10.2f}" for e in row))
fig, ax = plt.subplots(figsize=(7.5, 3.5), layout="constrained")
for j, q in enumerate(rates):
    ax.plot(sigmas, [table[s][j] for s in sigmas], "o-", label=f"q = {q:g} ({epochs * steps_per_epoch(q)} steps)")
ax.set_xlabel("noise multiplier σ"); ax.set_ylabel("ε"); ax.set_yscale("log"); ax.grid(alpha=0.3)
legend_outside(ax, fontsize=8)
ax.set_title(f"ε after {epochs} epochs")
plt.show()
'''),
        md("""
ε depends only weakly (logarithmically) on δ:
"""),
        code('''
q = poisson_sample_rate(N_TRAIN, BATCH)
steps = EPOCHS * steps_per_epoch(q)
for d in [1e-3, 1e-4, 1e-5, 1e-6, 1e-7]:
    print(f"delta = {d:.0e}: epsilon = {compute_epsilon([(dp['noise_multiplier'], q, steps)], delta=d):.3f}")
'''),
        md("""
## Lessons

* **Privacy costs accuracy**, and the cost shrinks with more data: the noise is added to a *sum* over the batch, so a
  larger N (at the same q) means more signal per unit of noise.
* **The cost is not uniform**: look at the per-stratum gaps, not only at the overall accuracy.
* **What is protected**: DP-SGD covers the *training* set. The best epoch (`model_best.pt`) is chosen on the
  validation split, which gets no protection from DP and whose use is not accounted for; use the last epoch
  (`model.pt`, `test_accuracy_last` in `summary.json`) when that matters.
* **Report ε with δ, the accountant, σ, q and the number of steps**: `summary.json` holds all of them.
"""),
    ]
    return new_notebook(cells=cells, metadata=_metadata())


def _metadata() -> dict:
    return {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }


NOTEBOOKS = {"01_data_and_preprocessing.ipynb": notebook_01, "02_training_baseline_vs_dp.ipynb": notebook_02}


def render(name: str) -> str:
    """The text of notebook ``name`` as it is stored: no outputs, cell ids numbered (the same bytes every time)."""
    nb = NOTEBOOKS[name]()
    for i, cell in enumerate(nb.cells):
        cell.id = f"{name[:2]}-{i:02d}"
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main() -> None:
    for name in NOTEBOOKS:
        (HERE / name).write_text(render(name), encoding="utf-8")
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()

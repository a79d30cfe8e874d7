"""Epochs of the default CIFAR-10 recipe (K = 4) that fit a training budget at the probed speed (session 10).

epochs = budget // (seconds an epoch at the bench_augmult K = 4 library row's views/s, over 0.85 for the loader,
the EMA and the step's host work, + 2 s for the test pass and the checkpoint). Nothing here looks at accuracy."""
import json
import sys

import yaml

probe, budget, base, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
speed = {r["k"]: r["views_per_s"] for r in json.load(open(probe))["rows"] if r["row"] == "dp"}
recipe = yaml.safe_load(open(base))
k = recipe["optim"]["augmult"]
epochs = int(budget // (50000 * k / (0.85 * speed[k]) + 2.0))
recipe["optim"]["epochs"] = epochs
with open(out, "w") as f:
    yaml.safe_dump(recipe, f, sort_keys=False)
print(f"probe views/s {speed}; K = {k}, {epochs} epochs for {budget:.0f} s")

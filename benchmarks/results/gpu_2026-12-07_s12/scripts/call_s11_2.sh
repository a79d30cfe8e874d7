#!/bin/bash
# Session 11, call 2 (issue 24): the default CIFAR-10 recipe (K = 4) at eps = 8 with the epochs that fill a
# 10-minute call at session 10's measured 10.4 s an epoch (H100; H200 about 1.09x faster, session 8), the
# test set after every epoch (a curve, nothing chosen on it). Epochs from speed alone.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
S=$(date +%s)
[ -d /tmp/data/cifar-10-batches-py ] || python .carry/cifar/unpack.py --out /tmp/data > $OUT/unpack.txt 2>&1
echo "data $(( $(date +%s) - S ))s"
E=52; grep -q H200 $OUT/gpu.txt && E=56
sed "s/^  epochs: 39$/  epochs: $E/" src/dpvision/recipes/default_cifar10.yaml > $OUT/recipe_eps8.yaml
grep -q "epochs: $E" $OUT/recipe_eps8.yaml || exit 3
LEFT=$(( 590 - ($(date +%s) - S) ))
timeout $(( LEFT - 5 )) python benchmarks/time_to_accuracy.py --recipe $OUT/recipe_eps8.yaml --epsilons 8 \
  --max-minutes $(python3 -c "print(($LEFT - 25) / 60)") --data-root /tmp/data --device cuda --out /tmp/tta8 > $OUT/tta8.txt 2>&1
echo "tta rc=$? $(( $(date +%s) - S ))s"
cd /tmp/tta8 && find . -type f ! -name '*.pt' -size -4M | tar czf $OUT/tta8.tgz -T - ; cd - >/dev/null
tail -n 12 $OUT/tta8.txt

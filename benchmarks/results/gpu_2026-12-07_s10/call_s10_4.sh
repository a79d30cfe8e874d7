#!/bin/bash
# Session 10, call 4: a CIFAR-10 sitting at eps = 1 (default recipe, K = 4, 28 epochs: what fits ~5 minutes).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD PYTHONUNBUFFERED=1
S=$(date +%s)
[ -d /tmp/data/cifar-10-batches-py ] || python .carry/cifar/unpack.py --out /tmp/data > /dev/null 2>&1
echo "data $(( $(date +%s) - S ))s"
sed 's/^  epochs: 30$/  epochs: 28/' src/dpvision/recipes/default_cifar10.yaml > $OUT/recipe_eps1.yaml
timeout 340 python benchmarks/time_to_accuracy.py --recipe $OUT/recipe_eps1.yaml --epsilons 1 --max-minutes 5.4 \
  --data-root /tmp/data --device cuda --out /tmp/tta1 > $OUT/tta1.txt 2>&1
echo "tta rc=$? $(( $(date +%s) - S ))s"
cd /tmp/tta1 && find . -type f ! -name '*.pt' -size -4M | tar czf $OUT/tta1.tgz -T - ; cd - >/dev/null
tail -n 5 $OUT/tta1.txt; grep -c epochs $OUT/recipe_eps1.yaml; grep 'epochs:' $OUT/recipe_eps1.yaml

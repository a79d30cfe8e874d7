#!/bin/bash
# Session 11, call 3 (issue 24): the default CIFAR-10 recipe (K = 4) at eps = 4 and eps = 2, E epochs each
# (what fits the call; epochs from speed alone), the test set after every epoch (a curve).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
S=$(date +%s)
E=${E:-25}
[ -d /tmp/data/cifar-10-batches-py ] || python .carry/cifar/unpack.py --out /tmp/data > $OUT/unpack.txt 2>&1
sed "s/^  epochs: 39$/  epochs: $E/" src/dpvision/recipes/default_cifar10.yaml > $OUT/recipe_e$E.yaml
grep -q "epochs: $E" $OUT/recipe_e$E.yaml || exit 3
for eps in ${EPS:-4 2}; do
  LEFT=$(( 585 - ($(date +%s) - S) ))
  timeout $(( LEFT - 5 )) python benchmarks/time_to_accuracy.py --recipe $OUT/recipe_e$E.yaml --epsilons $eps \
    --max-minutes $(python3 -c "print(($LEFT - 20) / 60)") --data-root /tmp/data --device cuda --out /tmp/tta_eps$eps > $OUT/tta_eps$eps.txt 2>&1
  echo "tta eps=$eps rc=$? $(( $(date +%s) - S ))s"
  cd /tmp/tta_eps$eps && find . -type f ! -name '*.pt' -size -4M | tar czf $OUT/tta_eps$eps.tgz -T - ; cd - >/dev/null
  tail -n 4 $OUT/tta_eps$eps.txt
done

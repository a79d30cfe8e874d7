#!/bin/bash
# Session 10, call 2: the library's new chunk rule (<= 256 examples a chunk on CUDA under augmult, kept
# gradients from bf16 operands there): B = 256 WRN row, K = 4/16 library rows, then a CIFAR-10 sitting of the
# default recipe (K = 4) with the epochs that fill the call.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
S=$(date +%s)
python .carry/cifar/unpack.py --out /tmp/data > $OUT/unpack.txt 2>&1 &
timeout 80 python benchmarks/bench_dpsgd.py --device cuda --workloads wrn16_4 --wrn-engines plain,fast:precision=bf16 \
  --max-steps 60 --warmup-steps 5 --epochs 3 --large-batch 0 --wrn-size 16384 --json $OUT/b256_wrn.json > $OUT/b256_wrn.txt 2>&1
echo "b256 rc=$? $(( $(date +%s) - S ))s"
timeout 90 python benchmarks/bench_augmult.py --device cuda --ks 4,16 --batch 4096 --precision bf16 --vmap-ks "" \
  --plain none --steps 2 --warmup-steps 2 --json $OUT/probe.json > $OUT/probe.txt 2>&1
echo "probe rc=$? $(( $(date +%s) - S ))s"
wait; echo "unpack $(( $(date +%s) - S ))s"
LEFT=$(( 600 - 15 - ($(date +%s) - S) ))
python .carry/pick_epochs.py $OUT/probe.json $(( LEFT - 60 )) src/dpvision/recipes/default_cifar10.yaml $OUT/recipe.yaml || exit 1
timeout $(( LEFT - 10 )) python benchmarks/time_to_accuracy.py --recipe $OUT/recipe.yaml --epsilons 8 \
  --max-minutes $(python3 -c "print(($LEFT - 35) / 60)") --data-root /tmp/data --device cuda --out /tmp/tta > $OUT/tta.txt 2>&1
echo "tta rc=$? $(( $(date +%s) - S ))s"
cd /tmp/tta && find . -type f ! -name '*.pt' -size -4M | tar czf $OUT/tta.tgz -T - ; cd - >/dev/null
grep -A3 'ms/step' $OUT/b256_wrn.txt | tail -4; grep -A4 '^row' $OUT/probe.txt; tail -n 25 $OUT/tta.txt

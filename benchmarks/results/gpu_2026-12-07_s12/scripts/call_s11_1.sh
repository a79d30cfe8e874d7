#!/bin/bash
# Session 11, call 1 (issues 23, 22): the "next to measure" rows of session 10, side by side in one call.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
S=$(date +%s)
t() { echo "== $1 rc=$2 $(( $(date +%s) - S ))s"; }
# 1. WRN-16-4 B = 256: the keep budget outside augmult (0.125 GiB) against every layer kept.
timeout 150 python benchmarks/bench_dpsgd.py --device cuda --workloads wrn16_4 \
  --wrn-engines plain,fast:precision=bf16,fast:precision=bf16+keep_gb=4,fast:precision=bf16+keep_gb=1 \
  --max-steps 60 --warmup-steps 5 --epochs 3 --large-batch 0 --wrn-size 16384 --json $OUT/b256_keep.json > $OUT/b256_keep.txt 2>&1; t b256 $?
# 2. ResNet-18 (issue 22): keep budget under bf16, against eager and compiled plain rows.
timeout 200 python benchmarks/bench_models.py --device cuda --workloads resnet18_gn --steps 15 --rounds 3 --warmup-steps 5 \
  --resnet-engines plain:precision=tf32,fast:precision=tf32,fast:precision=bf16,fast:precision=bf16+keep_gb=12,plain:precision=bf16+channels_last=1+compile=1 \
  --json $OUT/resnet_keep.json > $OUT/resnet_keep.txt 2>&1; t resnet $?
# 3. K = 2 and 3: 256-example chunks (kept from bf16 operands) against the library's 4,096-view chunks.
timeout 90 python benchmarks/bench_augmult.py --device cuda --ks 2 --batch 4096 --physical 512,4096 --precision bf16 \
  --vmap-ks "" --plain none --steps 2 --warmup-steps 2 --json $OUT/k2.json > $OUT/k2.txt 2>&1; t k2 $?
timeout 90 python benchmarks/bench_augmult.py --device cuda --ks 3 --batch 4096 --physical 768,4096 --precision bf16 \
  --vmap-ks "" --plain none --steps 2 --warmup-steps 2 --json $OUT/k3.json > $OUT/k3.txt 2>&1; t k3 $?
# 4. MNIST, 3 full epochs (target <= 0.1 s a DP epoch).
mkdir -p /tmp/mn && cp -r .carry/data/MNIST /tmp/mn/
timeout 60 python benchmarks/bench_dpsgd.py --device cuda --workloads mnist --engines fast --epochs 3 --large-batch 0 \
  --data-root /tmp/mn --json $OUT/mnist_full.json > $OUT/mnist_full.txt 2>&1; t mnist $?

for f in b256_keep resnet_keep k2 k3 mnist_full; do echo "--- $f"; grep -v "^\s*$" $OUT/$f.txt | tail -n 9; done

#!/bin/bash
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
timeout 100 python benchmarks/bench_dpsgd.py --device cuda --workloads wrn16_4 \
  --wrn-engines plain,fast:precision=bf16,fast:precision=bf16+keep_gb=4,fast:precision=bf16+keep_gb=2 \
  --max-steps 60 --warmup-steps 5 --epochs 3 --large-batch 0 --wrn-size 16384 --json $OUT/b256_keep2.json > $OUT/b256_keep2.txt 2>&1
echo "rc=$?"; grep -v "^\s*$" $OUT/b256_keep2.txt | tail -n 9

#!/bin/bash
# Session 10, call 1 (issue 23): bisect the B = 256 slowdown (bench_commits.py), then a profile of the
# channels-last K = 16 step (why it was slower than NCHW).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
S=$(date +%s)
timeout 330 python benchmarks/bench_commits.py run --again --out $OUT/bisect -- --device cuda \
  --workloads wrn16_4,celeba64 --engines fast --wrn-engines plain,fast:precision=bf16 --max-steps 60 \
  --warmup-steps 5 --epochs 3 --large-batch 0 --celeba-size 8192 --wrn-size 16384 > $OUT/bisect.txt 2>&1
echo "bisect rc=$? $(( $(date +%s) - S ))s"
cd $OUT && tar czf bisect.tgz bisect && rm -rf bisect; cd - > /dev/null
LEFT=$(( 570 - ($(date +%s) - S) ))
timeout $LEFT python benchmarks/profile_dp_step.py --device cuda --sections profile --batch-size 4096 --wrn-size 8192 \
  --profile "wrn16_4:dp:precision=bf16,augmult=16,channels_last=1" --profile-steps 2 --rows 40 --out /tmp/prof > $OUT/prof.txt 2>&1
echo "profile rc=$? $(( $(date +%s) - S ))s"
cp /tmp/prof/*.txt $OUT/ 2>/dev/null
tail -n 12 $OUT/bisect.txt; head -c 6000 /tmp/prof/profile_*.txt

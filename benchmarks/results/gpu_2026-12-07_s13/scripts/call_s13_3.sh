#!/bin/bash
# Session 13, call 3: finish paused eps = 2 / eps = 1 sittings (same machine, ./runs kept), then short benches:
# WRN-16-4 B = 256 with the keep default of session 12 (issue 23), ResNet-18 with the compiled reduce-overhead
# plain row (issue 22), a profile of the default recipe's K = 4 step (issue 23).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
S=$(date +%s)
for EPS in 2 1; do
  D=runs/gpu_s13/tta_eps$EPS
  [ -d $D ] || continue
  timeout 120 python benchmarks/time_to_accuracy.py --epsilons $EPS --data-root /tmp/data --device cuda --out $D > $OUT/tta_eps${EPS}_resume.txt 2>&1
  echo "resume eps=$EPS rc=$? $(( $(date +%s) - S ))s"
  cd $D && find . -type f ! -name '*.pt' -size -4M | tar czf $OUT/tta_eps$EPS.tgz -T - ; cd - >/dev/null
  tail -n 2 $OUT/tta_eps${EPS}_resume.txt
done
mkdir -p /tmp/b
timeout 100 python benchmarks/bench_dpsgd.py --device cuda --workloads wrn16_4 \
  --wrn-engines plain,fast:precision=bf16,fast:precision=bf16+keep_gb=4 \
  --max-steps 60 --warmup-steps 5 --epochs 3 --large-batch 0 --wrn-size 16384 --json /tmp/b/b256.json > /tmp/b/b256.txt 2>&1
echo "b256 rc=$? $(( $(date +%s) - S ))s"; grep -v "^\s*$" /tmp/b/b256.txt | tail -n 6
timeout 200 python benchmarks/bench_models.py --device cuda --workloads resnet18_gn --steps 15 --rounds 3 --warmup-steps 5 \
  --resnet-engines "plain,plain:compile=reduce-overhead+precision=bf16+channels_last=1,opacus-hooks:precision=tf32,fast:precision=tf32,fast:precision=bf16+channels_last=1" \
  --json /tmp/b/resnet.json > /tmp/b/resnet.txt 2>&1
echo "resnet rc=$? $(( $(date +%s) - S ))s"; grep -v "^\s*$" /tmp/b/resnet.txt | tail -n 12
timeout 100 python benchmarks/bench_augmult.py --device cuda --ks 4 --batch 4096 --physical 1024,2048 --precision bf16 --kept-precision library,reduced \
  --vmap-ks "" --plain none --steps 2 --warmup-steps 3 --json /tmp/b/k4_phys.json > /tmp/b/k4_phys.txt 2>&1
echo "k4 rc=$? $(( $(date +%s) - S ))s"; grep -v "^\s*$" /tmp/b/k4_phys.txt | tail -n 4
timeout 120 python .carry/prof_resnet.py cuda 20000 > /tmp/b/prof_resnet.txt 2>&1
echo "prof_resnet rc=$? $(( $(date +%s) - S ))s"; grep "^==" /tmp/b/prof_resnet.txt
LEFT=$(( 330 - ($(date +%s) - S) ))
timeout $LEFT python benchmarks/profile_dp_step.py --device cuda --sections profile --batch-size 4096 --wrn-size 8192 \
  --profile "wrn16_4:dp:precision=bf16,augmult=4,augment_flip=1" --profile-steps 2 --rows 40 --out /tmp/b/prof > /tmp/b/prof.txt 2>&1
echo "profile rc=$? $(( $(date +%s) - S ))s"
cp /tmp/b/prof/*.txt /tmp/b/ 2>/dev/null; rm -rf /tmp/b/prof
cd /tmp/b && tar czf $OUT/bench.tgz . ; cd - >/dev/null
head -c 3000 /tmp/b/profile_*.txt

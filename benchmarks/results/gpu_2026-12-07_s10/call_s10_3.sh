#!/bin/bash
# Session 10, call 3: GPU tests after the chunk rule; B = 256 MNIST/CelebA rows (TF32 and bf16); ViT-B/16 and
# ResNet-18 rows (issue 22) with kept gradients from the bf16 operands in chunks of <= 256 examples.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks:$PWD PYTHONUNBUFFERED=1 DPVISION_MNIST_SOURCE=$PWD/.carry/data/MNIST/raw
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu.txt
S=$(date +%s)
timeout 150 python -m pytest -q -m gpu tests -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; echo "tests rc=$? $(( $(date +%s) - S ))s"
timeout 130 python benchmarks/bench_dpsgd.py --device cuda --workloads mnist,celeba64 --engines opacus,fast,fast:precision=bf16 \
  --stock-max-steps 20 --max-steps 60 --warmup-steps 5 --epochs 2 --large-batch 0 --celeba-size 8192 --data-root .carry/data \
  --json $OUT/b256_mc.json > $OUT/b256_mc.txt 2>&1; echo "b256 rc=$? $(( $(date +%s) - S ))s"
timeout 110 python benchmarks/bench_models.py --device cuda --workloads vit_b_16 --steps 10 --rounds 2 --warmup-steps 4 \
  --vit-engines opacus-hooks:precision=tf32,fast:precision=tf32+grad_sample_mode=vmap,fast:precision=bf16+grad_sample_mode=manual,fast:precision=bf16+grad_sample_mode=manual+method=materialise+keep_gb=20 \
  --json $OUT/vit.json > $OUT/vit.txt 2>&1; echo "vit rc=$? $(( $(date +%s) - S ))s"
timeout 100 python benchmarks/bench_models.py --device cuda --workloads resnet18_gn --steps 15 --rounds 3 --warmup-steps 5 \
  --resnet-engines plain,opacus-hooks:precision=tf32,fast:precision=tf32,fast:precision=bf16,fast:precision=bf16+channels_last=1 \
  --json $OUT/resnet.json > $OUT/resnet.txt 2>&1; echo "resnet rc=$? $(( $(date +%s) - S ))s"
tail -n 8 $OUT/gpu_tests.txt; tail -n 14 $OUT/b256_mc.txt; tail -n 12 $OUT/vit.txt; tail -n 12 $OUT/resnet.txt

#!/bin/bash
# Session 12: the scratch arm at lr 8 too (both arms at the same learning rates), seed 0, validation only.
while [ ! -f /work/exp/prior_ab6.done ]; do sleep 10; done
D=/work/main/.venv/bin/dpvision
base="--dataset cifar10 --data-root /work/exp/cifar_root --model celeba_cnn --val-size 5000 --epochs 20 --batch-size 1024 --momentum 0.9 --max-grad-norm 0.1 --set optim.augmult=0 --set optim.ema_decay=0.999 --set run.precision=fp32 --set run.evaluate_test=false --device cpu --runs-dir /work/exp/runs --quiet --seed 0"
$D train $base --target-epsilon 8 --lr 8 --run-name eps8_scratch_lr8 > /work/exp/eps8_scratch_lr8.log 2>&1
$D train $base --target-epsilon 1 --lr 8 --run-name eps1_scratch_lr8 > /work/exp/eps1_scratch_lr8.log 2>&1

#!/bin/bash
while pgrep -f prior_ab2.sh > /dev/null; do sleep 10; done
D=/work/main/.venv/bin/dpvision
common="--dataset cifar10 --data-root /work/exp/cifar_root --model celeba_cnn --val-size 5000 --epochs 20 --batch-size 1024 --lr 4 --momentum 0.9 --max-grad-norm 0.1 --target-epsilon 8 --set optim.augmult=0 --set optim.ema_decay=0.999 --set run.precision=fp32 --set run.evaluate_test=false --device cpu --runs-dir /work/exp/runs --quiet"
P="--set model.init=/work/exp/runs/synthetic/synth_pre/model.pt --set model.init_head=reset"
$D train $common --run-name eps8_scratch > /work/exp/eps8_scratch.log 2>&1
$D train $common $P --run-name eps8_prior > /work/exp/eps8_prior.log 2>&1

#!/bin/bash
# Session 12: the prior arm at smaller learning rates (session 11 used lr 4 for both arms), seed 0, validation only.
D=/work/main/.venv/bin/dpvision
base="--dataset cifar10 --data-root /work/exp/cifar_root --model celeba_cnn --val-size 5000 --epochs 20 --batch-size 1024 --momentum 0.9 --max-grad-norm 0.1 --set optim.augmult=0 --set optim.ema_decay=0.999 --set run.precision=fp32 --set run.evaluate_test=false --device cpu --runs-dir /work/exp/runs --quiet --seed 0"
P="--set model.init=/work/exp/runs/synthetic/synth_pre/model.pt --set model.init_head=reset"
$D train $base $P --target-epsilon 8 --lr 2 --run-name eps8_prior_lr2 > /work/exp/eps8_prior_lr2.log 2>&1
$D train $base $P --target-epsilon 8 --lr 1 --run-name eps8_prior_lr1 > /work/exp/eps8_prior_lr1.log 2>&1
$D train $base $P --target-epsilon 1 --lr 2 --run-name eps1_prior_lr2 > /work/exp/eps1_prior_lr2.log 2>&1

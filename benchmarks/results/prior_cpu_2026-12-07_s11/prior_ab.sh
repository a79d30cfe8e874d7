#!/bin/bash
# CPU ablation: synthetic prior vs scratch, celeba_cnn on CIFAR-10 (45k train, 5k validation), eps = 1,
# one configuration (not tuned), judged on validation only (test set not evaluated).
D=/work/main/.venv/bin/dpvision
common="--dataset cifar10 --data-root /work/exp/cifar_root --model celeba_cnn --val-size 5000 --epochs 20 --batch-size 1024 --lr 4 --momentum 0.9 --max-grad-norm 0.1 --target-epsilon 1 --set optim.augmult=0 --set optim.ema_decay=0.999 --set run.precision=fp32 --set run.evaluate_test=false --device cpu --runs-dir /work/exp/runs --quiet"
$D train $common --run-name eps1_scratch > /work/exp/eps1_scratch.log 2>&1
$D train $common --set model.init=/work/exp/runs/synthetic/synth_pre/model.pt --set model.init_head=reset --run-name eps1_prior > /work/exp/eps1_prior.log 2>&1

#!/bin/bash
D=/work/main/.venv/bin/dpvision
common="--dataset cifar10 --data-root /work/exp/cifar_root --model celeba_cnn --val-size 5000 --epochs 20 --batch-size 1024 --lr 4 --momentum 0.9 --max-grad-norm 0.1 --target-epsilon 1 --set optim.augmult=0 --set optim.ema_decay=0.999 --set run.precision=fp32 --set run.evaluate_test=false --device cpu --runs-dir /work/exp/runs --quiet"
P="--set model.init=/work/exp/runs/synthetic/synth_pre/model.pt --set model.init_head=reset"
$D train $common --seed 1 --run-name eps1_scratch_s1 > /work/exp/eps1_scratch_s1.log 2>&1
$D train $common $P --seed 1 --run-name eps1_prior_s1 > /work/exp/eps1_prior_s1.log 2>&1
$D train $common $P --set model.finetune=linear_probe --run-name eps1_prior_probe > /work/exp/eps1_prior_probe.log 2>&1

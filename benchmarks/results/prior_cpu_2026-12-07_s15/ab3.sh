#!/bin/bash
# Session 15: eps 8, all layers, lr 8, seed 1 (its own validation split): the contrastive prior and scratch.
D=/work/main/.venv/bin/dpvision
base="--dataset cifar10 --data-root /work/exp/cifar_root --model celeba_cnn --val-size 5000 --epochs 20 --batch-size 1024 --momentum 0.9 --max-grad-norm 0.1 --set optim.augmult=0 --set optim.ema_decay=0.999 --set run.precision=fp32 --set run.evaluate_test=false --device cpu --runs-dir /work/exp/runs --quiet --seed 1"
P="--set model.init=/work/exp/runs/synthetic/synth_contrastive/model.pt --set model.init_head=reset"
$D train $base $P --target-epsilon 8 --lr 8 --run-name c_eps8_all_lr8_s1 > /work/exp/s15/c_eps8_all_lr8_s1.log 2>&1
$D train $base --target-epsilon 8 --lr 8 --run-name eps8_scratch_lr8_s1 > /work/exp/s15/eps8_scratch_lr8_s1.log 2>&1
touch /work/exp/s15/ab3.done

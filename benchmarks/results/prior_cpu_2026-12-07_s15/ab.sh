#!/bin/bash
# Session 15: the contrastive synthetic prior against session 11/12's arms (same split, settings, seed 0), validation only.
while ! grep -q '^done' /work/exp/s15/pre.log; do sleep 10; done
D=/work/main/.venv/bin/dpvision
base="--dataset cifar10 --data-root /work/exp/cifar_root --model celeba_cnn --val-size 5000 --epochs 20 --batch-size 1024 --momentum 0.9 --max-grad-norm 0.1 --set optim.augmult=0 --set optim.ema_decay=0.999 --set run.precision=fp32 --set run.evaluate_test=false --device cpu --runs-dir /work/exp/runs --quiet --seed 0"
P="--set model.init=/work/exp/runs/synthetic/synth_contrastive/model.pt --set model.init_head=reset"
$D train $base $P --target-epsilon 1 --lr 4 --set model.finetune=linear_probe --run-name c_eps1_probe > /work/exp/s15/c_eps1_probe.log 2>&1
$D train $base $P --target-epsilon 1 --lr 4 --run-name c_eps1_all_lr4 > /work/exp/s15/c_eps1_all_lr4.log 2>&1
$D train $base $P --target-epsilon 8 --lr 8 --run-name c_eps8_all_lr8 > /work/exp/s15/c_eps8_all_lr8.log 2>&1
touch /work/exp/s15/ab.done

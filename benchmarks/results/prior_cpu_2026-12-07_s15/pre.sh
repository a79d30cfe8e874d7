#!/bin/bash
# Session 15: contrastive pretraining of celeba_cnn on 50,000 synthetic images (no privacy, no real data).
D=/work/main/.venv/bin/dpvision
$D train --dataset synthetic --model celeba_cnn --disable-dp --epochs 15 --batch-size 512 --lr 0.1 --momentum 0.9 \
  --set optim.schedule=cosine --set optim.objective=contrastive --set optim.temperature=0.5 --set run.precision=fp32 \
  --set run.test_every_epoch=false --device cpu --runs-dir /work/exp/runs --run-name synth_contrastive --quiet

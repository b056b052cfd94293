#!/usr/bin/env bash
# W=2 gloo DDP ranks with per-rank batch 64 against one process with batch 128, same recipe and seed.
# ATAS uses per-sample gradient scaling so that its step does not depend on the per-rank batch size.
set -euo pipefail
common=(fmnist model.arch=wong_cnn method.grad_norm=per_sample train.progress=false eval.attacks=clean,pgd)
atas train "${common[@]}" train.batch_size=128 --run-dir runs/ddp-w1
OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m atas train "${common[@]}" train.batch_size=64 train.device=cpu \
    --run-dir runs/ddp-w2

#!/usr/bin/env bash
# Accuracy effect of the int8 per-sample store against fp32 (issue: memory-lean store).
# ATAS on Fashion-MNIST (fmnist recipe, Wong's CNN for speed), 2 seeds each, PGD-50-10 on 1000 test images.
set -euo pipefail
common=(fmnist model.arch=wong_cnn train.progress=false --methods atas --seeds 2 --attacks clean,pgd --n-examples 1000)
atas compare "${common[@]}" --out reports/store-fp32
atas compare "${common[@]}" train.store_dtype=int8 --out reports/store-int8

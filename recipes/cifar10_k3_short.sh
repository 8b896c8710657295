#!/usr/bin/env bash
# SimCNN k=3 on CIFAR-10 with the fidelity reference's shortened schedule (10 epochs per block, lr / 5 every 4).
set -euo pipefail
data=${1:?usage: $0 CIFAR10_JPEG_TRAIN_FOLDER}
out=${OUT_DIR:-runs}/cifar10_k3_short
${LAYERWISE:-layerwise} train --preset cifar10_simcnn_k3 --data "$data" --epochs-per-block 10 --set train.lr_step=4 \
    --seed 0 --out "$out" "${@:2}"

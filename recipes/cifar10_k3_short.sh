#!/usr/bin/env bash
# SimCNN k=3 on CIFAR-10 with the fidelity reference's shortened schedule (10 epochs per block, lr / 5 every 4).
# With VAL_DATA set to a test split, it trains on all 50,000 images and scores that split after every epoch.
set -euo pipefail
data=${1:?usage: [VAL_DATA=TEST_SPLIT] $0 CIFAR10_JPEG_TRAIN_FOLDER}
out=${OUT_DIR:-runs}/cifar10_k3_short
split=()
[ -n "${VAL_DATA:-}" ] && split=(--val-data "$VAL_DATA" --val-size 0)
${LAYERWISE:-layerwise} train --preset cifar10_simcnn_k3 --data "$data" --epochs-per-block 10 --set train.lr_step=4 \
    --seed 0 --out "$out" "${split[@]}" "${@:2}"

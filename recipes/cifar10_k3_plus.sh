#!/usr/bin/env bash
# SimCNN k=3 on CIFAR-10 with the modern greedy recipe (cifar10_simcnn_k3_plus, 50 epochs per block), and its end
# to end twin at the same 200 epochs (every ingredient that applies; the one-cycle warm-up a quarter of the run).
# With VAL_DATA set to a test split, both train on all 50,000 images and score that split after every epoch.
set -euo pipefail
data=${1:?usage: [VAL_DATA=TEST_SPLIT] $0 CIFAR10_JPEG_TRAIN_FOLDER}
out=${OUT_DIR:-runs}
split=()
[ -n "${VAL_DATA:-}" ] && split=(--val-data "$VAL_DATA" --val-size 0)
layerwise=${LAYERWISE:-layerwise}
$layerwise train --preset cifar10_simcnn_k3_plus --data "$data" --seed 0 --out "$out/cifar10_k3_plus" \
    "${split[@]}" "${@:2}"
$layerwise train --preset cifar10_simcnn_k3_plus --data "$data" --mode e2e --epochs-per-block 200 \
    --set train.warmup_epochs=50 --seed 0 --out "$out/cifar10_k3_plus_e2e" "${split[@]}" "${@:2}"

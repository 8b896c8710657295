#!/usr/bin/env bash
# The paper's CIFAR-10 recipe for SimCNN k (1, 2 or 3): greedy, then the end-to-end reference.
# With VAL_DATA set to a test split (e.g. cifar-10-python.tar.gz), both train on all 50,000 images and score
# that split after every epoch, as the paper did; without it they hold 5,000 training images out.
set -euo pipefail
data=${1:?usage: [VAL_DATA=TEST_SPLIT] $0 CIFAR10_JPEG_TRAIN_FOLDER K}
k=${2:?usage: [VAL_DATA=TEST_SPLIT] $0 CIFAR10_JPEG_TRAIN_FOLDER K}
out=${OUT_DIR:-runs}
split=()
[ -n "${VAL_DATA:-}" ] && split=(--val-data "$VAL_DATA" --val-size 0)
${LAYERWISE:-layerwise} train --preset "cifar10_simcnn_k$k" --data "$data" --out "$out/cifar10_k${k}_greedy" \
    "${split[@]}" "${@:3}"
${LAYERWISE:-layerwise} train --preset "cifar10_simcnn_k$k" --data "$data" --mode e2e --out "$out/cifar10_k${k}_e2e" \
    "${split[@]}" "${@:3}"

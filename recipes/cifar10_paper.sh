#!/usr/bin/env bash
# The paper's CIFAR-10 recipe for SimCNN k (1, 2 or 3): greedy, then the end-to-end reference.
set -euo pipefail
data=${1:?usage: $0 CIFAR10_JPEG_TRAIN_FOLDER K}
k=${2:?usage: $0 CIFAR10_JPEG_TRAIN_FOLDER K}
out=${OUT_DIR:-runs}
${LAYERWISE:-layerwise} train --preset "cifar10_simcnn_k$k" --data "$data" --out "$out/cifar10_k${k}_greedy" "${@:3}"
${LAYERWISE:-layerwise} train --preset "cifar10_simcnn_k$k" --data "$data" --mode e2e --out "$out/cifar10_k${k}_e2e" "${@:3}"

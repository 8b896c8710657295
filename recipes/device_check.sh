#!/usr/bin/env bash
# What to run when a GPU is lent: one call of the device tool, from the repository root, with the
# CIFAR-10 JPEG tarball carried in .device-data/:
#   bash recipes/device_check.sh
# The package runs from source (PYTHONPATH=.); results land in $OUT, or ./device-out.
set -uo pipefail
out=${OUT:-device-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=. LAYERWISE="python3 -m layerwise.cli" OUT_DIR="$out/runs"
[ -d .device-data/cifar10-jpeg ] || tar xzf .device-data/cifar10-jpeg-train.tar.gz -C .device-data
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_bench.py -k "not compiled" 2>&1 | tail -5 \
  | tee "$out/gpu-tests.txt"
$LAYERWISE bench --preset cifar10_simcnn_k3 --device cuda --json > "$out/bench-k3.json"
# The memory goal: VGG-11 k=3 block 0 against end-to-end, batch 128, 224 px, bf16, with and without
# recomputed activations.
$LAYERWISE bench --preset imagenet_vgg11_k3 --device cuda --blocks 0 --batch-size 128 --steps 3 --no-input \
  --recompute-activations --json > "$out/bench-vgg11.json"
# Does compiling pay for one block's step? (Each stage of a run compiles afresh.)
for mode in none default reduce-overhead; do
  $LAYERWISE bench --preset cifar10_simcnn_k3 --device cuda --blocks 1 --steps 50 --no-input --compile $mode \
    --json > "$out/bench-k3-compile-$mode.json"
done
start=$(date +%s)
bash recipes/cifar10_k3_short.sh .device-data/cifar10-jpeg/train --set train.cache=device 2>&1 | tee "$out/k3-short.log"
echo "k3 short schedule wall seconds: $(( $(date +%s) - start ))" | tee -a "$out/k3-short.log"

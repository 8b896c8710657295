#!/usr/bin/env bash
# What to run when a GPU is lent: one call of the device tool, from the repository root, with the
# CIFAR-10 JPEG tarball carried in .device-data/:
#   bash recipes/device_check.sh
# The package runs from source (PYTHONPATH=.); results land in $OUT, or ./device-out. The steps run in
# order of importance, each under its own time limit, so that a slow one cannot starve the rest. About
# 9 minutes in all if every step uses its limit; the device tool allows 10 per call.
set -uo pipefail
out=${OUT:-device-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=. LAYERWISE="python3 -m layerwise.cli" OUT_DIR="$out/runs"
step() {  # step NAME SECONDS COMMAND...: run it with a limit, log its output and wall time
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
[ -d .device-data/cifar10-jpeg ] || tar xzf .device-data/cifar10-jpeg-train.tar.gz -C .device-data
# 1. The CUDA code paths, which CI cannot run.
step gpu-tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_bench.py -k "gpu or cuda"
# 2. The goal: the paper's full k=3 schedule (50 epochs per block), evaluation included, against
#    90 s; summary.json holds the per-block accuracy. The plain path, since its accuracy is the reference: a
#    cache with fewer views than epochs repeats augmentations, and one view of block 1's input is 11 GiB.
step k3-paper 330 $LAYERWISE train --preset cifar10_simcnn_k3 --data .device-data/cifar10-jpeg/train \
  --out "$out/runs/cifar10_k3_paper"
# 3. The memory goal: VGG-11 k=3 block 0 against end-to-end, batch 128, 224 px, bf16, weights counted.
step bench-vgg11 90 $LAYERWISE bench --preset imagenet_vgg11_k3 --device cuda --blocks 0 --batch-size 128 \
  --steps 3 --no-input --recompute-activations
# 4. Every block of the k=3 preset, then whether compiling pays for one block's step.
step bench-k3 60 $LAYERWISE bench --preset cifar10_simcnn_k3 --device cuda --no-input
for mode in default reduce-overhead; do
  step "bench-k3-compile-$mode" 60 $LAYERWISE bench --preset cifar10_simcnn_k3 --device cuda --blocks 1 \
    --steps 50 --no-input --compile $mode
done

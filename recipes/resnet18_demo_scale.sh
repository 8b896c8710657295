#!/usr/bin/env bash
# ResNet-18 (torchvision, CIFAR stem) at the demo's scale: the built-in sample, the demo's recipe (4 epochs per
# module, batch 64, lr 0.05 / 5 every 3 epochs, 1,000 images held out), greedy in K=2 modules, seeds 0 and 1;
# its end-to-end twin at the same total of 8 epochs (seed 0); and the SimCNN demo at seeds 0 and 1. Resumable: a finished run is skipped, an
# unfinished one resumed. Results go in docs/results.md ("ResNet-18 at the demo's scale").
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resumable.sh
demo_recipe=(--epochs-per-block 4 --batch-size 64 --lr 0.05 --set train.lr_step=3 --set train.lr_gamma=0.2
  --set train.reset_momentum_at_decay=true --set train.weight_decay=0.0005 --set data.val_size=1000
  --set train.train_eval_size=1000)
for seed in 0 1; do
  run runs/demo-scale/resnet18-k2-seed$seed --preset cifar10_resnet18_k2 "${demo_recipe[@]}" --seed $seed
done
# End to end at the same total of 8 epochs, lr / 5 after 6 (the greedy modules' 3 of 4), seed 0
run runs/demo-scale/resnet18-k2-e2e-seed0 --preset cifar10_resnet18_k2_e2e "${demo_recipe[@]}" --seed 0 \
  --epochs-per-block 8 --set train.lr_step=6
for seed in 0 1; do
  run runs/demo-scale/demo-seed$seed --preset demo --seed $seed
done

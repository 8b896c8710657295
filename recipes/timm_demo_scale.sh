#!/usr/bin/env bash
# timm models at the demo's scale (docs/results.md, "timm models at the demo's scale"): the built-in sample, the
# demo's recipe (4 epochs per module, batch 64, lr 0.05 / 5 every 3 epochs, 1,000 images held out), each model
# of MODELS with timm's CIFAR stem change (model.stem=cifar) greedy in K=2 modules (the cifar10_timm_resnet18_k2
# preset with model.name set), and end to end at the same total of 8 epochs, lr / 5 after 6; seed 0. Needs timm
# (pip install 'layerwise[timm]'). Resumable: a finished run is skipped, an unfinished one resumed.
set -euo pipefail
cd "$(dirname "$0")/.."
source recipes/resumable.sh
models=${MODELS:-"regnety_002 mobilenetv3_small_100"}  # any timm CNNs: MODELS="efficientnet_b0 resnet18"
demo_recipe=(--epochs-per-block 4 --batch-size 64 --lr 0.05 --set train.lr_step=3 --set train.lr_gamma=0.2
  --set train.reset_momentum_at_decay=true --set train.weight_decay=0.0005 --set data.val_size=1000
  --set train.train_eval_size=1000 --seed 0)
for model in $models; do
  run "runs/timm-demo-scale/$model-k2-seed0" --preset cifar10_timm_resnet18_k2 --set "model.name=$model" \
    "${demo_recipe[@]}"
  run "runs/timm-demo-scale/$model-e2e-seed0" --preset cifar10_timm_resnet18_k2 --set "model.name=$model" \
    "${demo_recipe[@]}" --set train.mode=e2e --epochs-per-block 8 --set train.lr_step=6
done

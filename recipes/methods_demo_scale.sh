#!/usr/bin/env bash
# Greedy, decoupled and end to end on the demo network and the built-in sample at equal total epochs: greedy
# trains each of the 3 blocks for 4 epochs (12 in all, lr / 5 after 3 of each block's 4); decoupled and end to
# end train 12 epochs (every block at once), lr / 5 after 9 (the same 3/4 of the way). Seeds 0-3, CPU, resumable:
# a finished run is skipped, an unfinished one resumed. Results go in docs/results.md ("Greedy, decoupled and
# end to end"). SEEDS="0 1" runs fewer.
set -euo pipefail
cd "$(dirname "$0")/.."
layerwise=${LAYERWISE:-.venv/bin/layerwise}
run() {  # OUT ARGS...: train into OUT unless it has finished, resuming an interrupted run
  local out=$1
  shift
  if [[ -f $out/summary.json ]]; then return; fi
  if [[ -f $out/config.yaml ]]; then
    /usr/bin/time -f "$out %e s" "$layerwise" -q train --out "$out" --resume
  else
    /usr/bin/time -f "$out %e s" "$layerwise" -q train --out "$out" "$@"
  fi
}
for seed in ${SEEDS:-0 1 2 3}; do
  run runs/methods/greedy-seed$seed --preset demo --seed $seed
  run runs/methods/decoupled-seed$seed --preset demo --mode decoupled --epochs-per-block 12 \
    --set train.lr_step=9 --seed $seed
  run runs/methods/e2e-seed$seed --preset demo --mode e2e --epochs-per-block 12 --set train.lr_step=9 --seed $seed
done

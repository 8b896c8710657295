# Sourced by the recipes: run OUT ARGS... trains into OUT with `layerwise train ARGS...` unless the run has
# finished (summary.json), resuming it if it was interrupted (config.yaml); "OUT SECONDS s" on stderr.
layerwise=${LAYERWISE:-.venv/bin/layerwise}
run() {
  local out=$1
  shift
  if [[ -f $out/summary.json ]]; then return; fi
  if [[ -f $out/config.yaml ]]; then
    /usr/bin/time -f "$out %e s" "$layerwise" train --out "$out" --resume
  else
    /usr/bin/time -f "$out %e s" "$layerwise" train --out "$out" "$@"
  fi
}

"""Fingerprints of the runs a restructuring must not change: each run's metrics figures and final.pt tensors.

    python scripts/same_numbers.py OUT_DIR [--quick] [--only NAME ...]    # one JSON line per run
    python scripts/same_numbers.py --compare BEFORE.jsonl AFTER.jsonl     # a table; exit 1 on any difference

Run it at the commit before a change and at the commit after, on one machine with the same thread count
(figures differ between CPUs), and compare. The metrics fingerprint covers every figure of every metrics line
except the timings (`seconds`, `images_per_s`); the weights fingerprint covers every tensor of final.pt (name,
dtype, shape and bytes). `--quick` trains one epoch per block (one epoch in all end to end), for checking
each step of a change; without it the runs are the documented ones (the demo as `make demo` trains it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

TIMINGS = {"seconds", "images_per_s"}
DEMO = ["train", "--preset", "demo", "--device", "cpu"]
RUNS = {
    "demo": DEMO,
    "demo-e2e": [*DEMO, "--mode", "e2e"],
    "demo-decoupled": [*DEMO, "--mode", "decoupled"],
    "demo_plus": ["train", "--preset", "demo_plus", "--device", "cpu"],
    "demo-pipeline-3": [*DEMO, "--mode", "decoupled", "--placement", "pipeline"],
    "demo-ddp-2": DEMO,
    "demo-ema-mix-cutout-cache": [
        *DEMO,
        *("--set", "train.ema=0.99", "--set", "data.mix=cutmix", "--set", "data.cutout=8"),
        *("--set", "train.cache=host", "--set", "train.cache_views=2"),
    ],
    "resnet32_k4-short": [
        *("train", "--preset", "cifar10_resnet32_k4", "--device", "cpu", "--epochs-per-block", "2"),
        *("--set", "train.lr_step=1", "--val-size", "1000"),
    ],
}
"""Each run's arguments to `layerwise`; all train on the built-in sample."""
QUICK = {"demo_plus": ["--set", "train.block_epochs=[1,1,1]", "--set", "train.warmup_epochs=0.5"]}
"""--quick's arguments, where one epoch per block needs more than --epochs-per-block 1."""
PROCESSES = {"demo-pipeline-3": 3, "demo-ddp-2": 2}


def strip_timings(value):
    if isinstance(value, dict):
        return {k: strip_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value


def fingerprint(run: Path) -> dict:
    rows = [strip_timings(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    payload = torch.load(run / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
    weights = hashlib.sha256()
    for name, tensor in sorted(payload["model"].items()):
        weights.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        weights.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    last = rows[-1]
    figures = last.get("val") or last.get("train_eval") or {}
    return {
        "metrics": metrics,
        "final_pt": weights.hexdigest()[:16],
        "epochs": len(rows),
        "last_top1": figures.get("top1", figures.get("blocks")),
    }


def train(name: str, out: Path, quick: bool) -> dict:
    args = [*RUNS[name], "--out", str(out / name)]
    if quick:
        args += QUICK.get(name, ["--epochs-per-block", "1"])
    if (out / name / "summary.json").is_file():  # trained already (a rerun after an interruption)
        return {"run": name, "command": "layerwise " + " ".join(args), **fingerprint(out / name)}
    processes = PROCESSES.get(name, 1)
    launcher = [sys.executable, "-m", "layerwise", "-q"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        launcher += ["-m", "layerwise", "-q"]
    done = subprocess.run([*launcher, *args], capture_output=True, text=True)
    if done.returncode != 0:
        return {"run": name, "error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return {"run": name, "command": "layerwise " + " ".join(args), **fingerprint(out / name)}


def compare(before: Path, after: Path) -> int:
    old = {r["run"]: r for r in map(json.loads, before.read_text().splitlines())}
    new = {r["run"]: r for r in map(json.loads, after.read_text().splitlines())}
    differ = 0
    print("| run | metrics before | after | final.pt before | after | same |")
    print("|---|---|---|---|---|---|")
    for name in old:
        a, b = old[name], new.get(name, {})
        same = all(a.get(k) == b.get(k) and a.get(k) is not None for k in ("metrics", "final_pt"))
        differ += not same
        print(f"| {name} | {a.get('metrics')} | {b.get('metrics')} | {a.get('final_pt')} | {b.get('final_pt')} | "
              f"{'yes' if same else '**no**'} |")  # fmt: skip
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="a folder for the runs")
    parser.add_argument("--quick", action="store_true", help="one epoch per block")
    parser.add_argument("--only", nargs="+", choices=sorted(RUNS), help="these runs only")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("give OUT_DIR, or --compare BEFORE AFTER")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or RUNS:
        print(json.dumps(train(name, args.out, args.quick)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

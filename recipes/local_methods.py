"""Every local-learning method on one network, one dataset and one recipe, side by side (docs/results.md,
"Local-learning methods"): ResNet-32 on the built-in sample (9,000 training images, 1,000 held out).

    .venv/bin/python recipes/local_methods.py [--sets k4,k16] [--methods e2e,predsim] [--seeds 0,1] [--jobs 2]
        [--root runs/local] [--data PATH]
    .venv/bin/python recipes/local_methods.py --memory [--sets k4,k16]   # each method's step memory: ROOT/memory.json
    .venv/bin/python recipes/local_methods.py --table [--root runs/local]  # the table of what has finished

- k4: ResNet-32 in InfoPro's K = 4 modules: end to end, sequential greedy (Algorithm 1, the same epochs per
  module), and every module at once (train.mode=decoupled) with a pooling + linear head ("Greedy SL"), DGL's
  head, InfoPro Softmax and Contrast (their released lambdas for K = 4), and PredSim.
- k16: one module per layer (the stem and each of the 15 residual blocks): PredSim, and AugLocal (d = 2: the last
  3 layers one module with the classifier, so 14 modules).

The recipe, fixed before the runs: InfoPro's (160 epochs, batch 1024, lr 0.8, Nesterov, weight decay 1e-4,
cosine with 10 epochs of warm-up from 0.01, reflect padding, their normalisation) scaled to 20 epochs of the
sample at batch 128: lr and the warm-up's start times 128 / 1024 (0.1 and 0.00125, the linear scaling rule), the
warm-up 10 / 160 of the epochs (1.25). Resumable: a finished run (summary.json) is kept, an interrupted one resumed,
so the same command continues where it stopped. Runs go `--jobs` at a time with one thread each; the times in the
table are of that set-up.

`--memory` measures each method's training step as `layerwise bench` does (layerwise.bench.time_steps: the
process's peak resident memory over its steps above what it held before: activations, gradients, optimizer
state), at the recipe's batch of 128 on the CPU, each in a fresh process with one thread: the step that trains
every module at once, end to end's, and sequential greedy's largest stage; printed beside end to end's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 20
RECIPE = [
    "train.batch_size=128",
    "train.lr=0.1",
    "train.nesterov=true",
    "train.momentum=0.9",
    "train.weight_decay=0.0001",
    "train.schedule=cosine",
    "train.warmup_epochs=1.25",
    "train.warmup_from=0.00125",
    "data.crop_padding_mode=reflect",
    "data.mean=[0.491373,0.482353,0.446667]",
    "data.std=[0.247059,0.243529,0.261569]",
    "data.val_size=1000",
]
AT_ONCE = ["train.mode=decoupled"]
SETS: dict[str, dict[str, list[str]]] = {
    "k4": {
        "e2e": ["train.mode=e2e"],
        "greedy": ["train.mode=greedy"],  # InfoPro's '1c2f' heads (the preset's), one module after the other
        "greedy_sl": [*AT_ONCE, "model.head=linear"],
        "dgl": [*AT_ONCE, "model.head=dgl"],
        "infopro_softmax": [*AT_ONCE, "model.head=infopro_softmax", "model.head_lambdas=[6,0,1,2]"],
        "infopro_contrast": [*AT_ONCE, "model.head=infopro_contrast", "model.head_lambdas=[6,0,1,2]"],
        "predsim": [*AT_ONCE, "model.head=predsim"],
    },
    "k16": {
        "e2e": ["train.mode=e2e", "model.split=16"],  # the reference for the step memory
        "predsim": [*AT_ONCE, "model.split=16", "model.head=predsim"],
        # 14 modules: the first 13 layers alone, the last d + 1 = 3 with the classifier (their final module)
        "auglocal": [*AT_ONCE, "model.split=14", "model.head=auglocal", "model.aux_depth=2"],
    },
}


MEMORY_ONLY = {("k16", "e2e")}
"""Measured for --memory only: end to end trains the same network at any K (the k4 run)."""


def command(settings: list[str], seed: int, out: Path, data: str | None) -> list[str]:
    args = ["train", "--preset", "cifar10_resnet32_k4", "--device", "cpu", "--out", str(out), "--seed", str(seed)]
    args += ["--epochs-per-block", str(EPOCHS)] + (["--data", data] if data else [])
    return args + [a for s in [*RECIPE, *settings] for a in ("--set", s)]


def out_of(root: Path, group: str, name: str, seed: int) -> Path:
    return root / f"{group}-{name}-seed{seed}"


def train(job: tuple[Path, list[str], int, str | None]) -> None:
    out, settings, seed, data = job
    if (out / "summary.json").is_file():
        return
    resume = (out / "config.yaml").is_file()
    args = ["train", "--out", str(out), "--resume"] if resume else command(settings, seed, out, data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    done = subprocess.run([sys.executable, "-m", "layerwise", "-q", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"FAILED {out}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return
    print(f"{out.name}: {time.time() - t0:.0f} s", flush=True)


def resolved(settings: list[str]):
    from layerwise.config import parse_assignment
    from layerwise.presets import resolve_config

    items = [f"train.epochs_per_block={EPOCHS}", *RECIPE, *settings]
    return resolve_config("cifar10_resnet32_k4", None, [parse_assignment(a) for a in items])


def step_memory(group: str, name: str) -> None:
    """Print one method's training step memory in bytes (its largest stage's), as JSON: run in a fresh process."""
    import torch

    from layerwise.bench import Timing, time_steps
    from layerwise.device import precision_for
    from layerwise.models import build_model
    from layerwise.stages import plan_stages

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = resolved(SETS[group][name])
    net = build_model(cfg.model, 10)
    timing = Timing(cfg, precision_for(torch.device("cpu"), "fp32"), warmup=1, steps=1)
    x, y = torch.randn(cfg.train.batch_size, 3, 32, 32), torch.randint(0, 10, (cfg.train.batch_size,))
    steps = [time_steps(net, stage, x, y, 0, timing) for stage in plan_stages(net.J, cfg.train.mode)]
    print(json.dumps({"step_bytes": max(s["step_bytes"] for s in steps)}))


def memory(sets: list[str], root: Path) -> str:
    """Measure each method's step memory (a fresh process each), keep it in ROOT/memory.json, return the table."""
    path = root / "memory.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    lines = ["| set | method | step memory (MB) | against end to end |", "|---|---|---|---|"]
    for group in sets:
        measured = {}
        for name in SETS[group]:
            done = subprocess.run([sys.executable, __file__, "--memory-of", group, name], capture_output=True,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
            if done.returncode != 0:
                print(f"FAILED {group} {name}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            measured[name] = json.loads(done.stdout)["step_bytes"]
        kept[group] = measured
        e2e = measured.get("e2e")
        for name, size in measured.items():
            ratio = f"{size / e2e:.2f}x" if e2e else "-"
            lines.append(f"| {group} | {name} | {size / 2**20:.0f} | {ratio} |")
    path.write_text(json.dumps(kept, indent=2) + "\n")
    return "\n".join(lines)


def figures(out: Path) -> dict | None:
    """A finished run's validation top-1 of each module that classifies, the delivered network's, the training
    seconds and the mean images/s over its epochs."""
    if not (out / "summary.json").is_file():
        return None
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    modules = {b["block"]: b.get("val_top1") for b in summary["blocks"]}
    return {"modules": modules, "delivered": summary["final"]["val_top1"], "seconds": summary["train_seconds"],
            "images_per_s": statistics.mean(r["images_per_s"] for r in rows)}  # fmt: skip


def cell(values: list[float | None], digits: int = 1) -> str:
    """Mean ± sample standard deviation over the seeds, or - where a module does not classify."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def table(root: Path) -> str:
    """Per method: validation top-1 of the modules that classify (K = 4: each; per layer: modules 1, 8 and 15)
    and of the delivered network, over the seeds; training seconds, images/s, and the step memory against end to
    end's where --memory measured it."""
    memory = json.loads((root / "memory.json").read_text()) if (root / "memory.json").is_file() else {}
    lines = []
    for group, methods in SETS.items():
        modules = 4 if group == "k4" else 16
        shown = range(modules) if modules == 4 else (0, 7, 14)
        columns = ["method", "seeds", *(f"module {j + 1}" for j in shown), "delivered", "train s", "images/s",
                   "step memory"]  # fmt: skip
        lines += ["", f"{group}:", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        sizes = memory.get(group, {})
        for name in methods:
            runs = sorted(root.glob(f"{group}-{name}-seed*"))
            done = [(r.name.rsplit("seed", 1)[1], f) for r in runs if (f := figures(r))]
            if not done:
                continue
            seeds, scored = ",".join(s for s, _ in done), [f for _, f in done]
            per_module = [cell([f["modules"].get(j) for f in scored]) for j in shown]
            size, e2e = sizes.get(name), sizes.get("e2e")
            against = f"{size / e2e:.2f}x" if size and e2e else "-"
            rest = [cell([f["delivered"] for f in scored]), cell([f["seconds"] for f in scored], 0),
                    cell([f["images_per_s"] for f in scored], 0), against]  # fmt: skip
            lines.append(f"| {name} | {seeds} | {' | '.join([*per_module, *rest])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "local")
    parser.add_argument("--sets", default="k4,k16")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", help="only these (comma-separated names of the sets' methods)")
    parser.add_argument("--data", help="the data (default: the built-in sample)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-of", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        step_memory(*args.memory_of)
        return
    if args.memory:
        args.root.mkdir(parents=True, exist_ok=True)
        print(memory(args.sets.split(","), args.root))
        return
    if not args.table:
        args.root.mkdir(parents=True, exist_ok=True)
        seeds = [int(s) for s in args.seeds.split(",")]
        chosen = set(args.methods.split(",")) if args.methods else None
        wanted = [(g, n) for g in args.sets.split(",") for n in SETS[g] if not chosen or n in chosen]
        jobs = [(out_of(args.root, g, n, s), SETS[g][n], s, args.data) for s in seeds for g, n in wanted
                if (g, n) not in MEMORY_ONLY]  # fmt: skip
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(train, jobs))
    print(table(args.root))


if __name__ == "__main__":
    main()

"""Greedy, decoupled, pipelined and end-to-end training side by side on one network and one dataset.

    python benchmarks/methods.py                       # the demo preset on the built-in sample, 4 epochs per block
    python benchmarks/methods.py --epochs-per-block 1 --target 40 --out runs/methods-bench

Two parts, both printed as tables (and saved as JSON with --json FILE):
- steps: `layerwise bench`'s measurement (layerwise.bench.bench_model) of one training step of every greedy
  block, the end-to-end step and the decoupled step (every block at once), plain and with activations
  recomputed, in one process: images/s and the step's memory (activations, gradients, optimizer state; not the
  weights), against end to end's. The fair memory baseline beside them: end to end with gradient accumulation,
  at the micro-batch whose step memory is greedy block 0's. `--precision bf16` gives a GPU step's memory
  profile on the CPU (`--preset imagenet_vgg11_k3 --batch-size 128 --skip-training`: the issue's set-up).
- training: four real runs of the same budget, J x E epochs of data in all (greedy: E per block; decoupled,
  pipelined and end to end: J x E epochs of every block at once; lr steps at the same fraction of each): seconds
  of training (evaluation excluded), images/s, the seconds until the last trained head first reaches --target
  validation top-1, and the final figures. The pipelined run starts torchrun itself with --processes processes
  (one thread each, as torchrun sets); the others run in this machine's threads.

On a shared CPU only ratios from one invocation compare. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from layerwise.bench import BenchSpec, bench_model  # noqa: E402
from layerwise.presets import load_preset  # noqa: E402
from layerwise.rundir import RunDir  # noqa: E402


def train_command(method: str, out: Path, preset: str, epochs: int, J: int, lr_step: int, processes: int) -> list[str]:
    """The command line of one method's run: the same data and budget for all."""
    common = ["train", "--preset", preset, "--out", str(out), "--device", "cpu"]
    if method == "greedy":
        args = [*common, "--epochs-per-block", str(epochs)]
    else:  # every block at once for J x E epochs, lr steps at the same fraction of the run
        args = [*common, "--epochs-per-block", str(J * epochs), "--set", f"train.lr_step={J * lr_step}"]
        args += ["--mode", "e2e" if method == "e2e" else "decoupled"]
    if method == "pipelined":
        args += ["--placement", "pipeline"]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
        return [*launcher, "-m", "layerwise", "-q", *args]
    return [sys.executable, "-m", "layerwise", "-q", *args]


def summarize_run(out: Path, target: float) -> dict:
    rows = RunDir(out).read_metrics()
    elapsed, reached = 0.0, None
    for row in rows:
        elapsed += row["seconds"]
        if reached is None and "val" in row and row["val"]["top1"] >= target:
            reached = elapsed
    last = rows[-1]
    return {
        "epochs": len(rows),
        "train_seconds": elapsed,
        "images_per_s": sum(r["images_per_s"] for r in rows) / len(rows),
        "seconds_to_target": reached,
        "last_top1": last["val"]["top1"] if "val" in last else None,
        "ensemble_top1": last["val"]["ensemble_top1"] if "val" in last else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--epochs-per-block", type=int, default=4, help="E: greedy's epochs per block")
    parser.add_argument("--processes", type=int, default=0, help="pipeline processes (default: one per block)")
    parser.add_argument("--target", type=float, default=60.0, help="validation top-1 to time (percent)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="for the step measurement")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--batch-size", type=int, help="for the step measurement (default: the preset's)")
    parser.add_argument("--image-size", type=int, help="for the step measurement (default: the preset's)")
    parser.add_argument("--blocks", type=int, nargs="*", help="greedy blocks to measure (default: all)")
    parser.add_argument("--block-chunks", type=int, default=0, help="also greedy's steps with train.block_chunks")
    parser.add_argument("--out", default=f"runs/methods-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--skip-training", action="store_true", help="only the step measurement")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    cfg = load_preset(args.preset)
    J = len(cfg.model.widths)
    batch = args.batch_size or cfg.train.batch_size
    spec = BenchSpec(preset=args.preset, batch_size=batch, device="cpu", precision=args.precision,
                     image_size=args.image_size, recompute_activations=True)  # fmt: skip
    steps = bench_model(spec, steps=args.steps, blocks=args.blocks)
    if args.block_chunks:  # greedy's steps again, the block run in chunks (train.block_chunks)
        chunked = bench_model(dataclasses.replace(spec, block_chunks=args.block_chunks), steps=args.steps,
                              blocks=args.blocks)  # fmt: skip
        steps["chunked_blocks"] = chunked["blocks"]
    # The fair baseline: end to end with gradient accumulation, at the micro-batch whose step memory is greedy
    # block 0's. Step memory is a fixed part (the weights' gradients and momentum: twice the weights) plus
    # activations that grow about linearly with the batch.
    greedy0, e2e = steps["blocks"][0]["uncached"], steps["e2e"]
    fixed = 2 * e2e["weights_bytes"]
    per_image = (e2e["step_bytes"] - fixed) / batch if e2e["step_bytes"] else 0
    micro = max(1, min(batch, int((greedy0["step_bytes"] - fixed) / per_image))) if per_image > 0 else batch
    accumulated = bench_model(dataclasses.replace(spec, batch_size=micro, recompute_activations=False),
                              steps=args.steps, blocks=[])["e2e"]  # fmt: skip
    result = {"date": time.strftime("%Y-%m-%d"), "preset": args.preset, "steps": steps, "training": {},
              "e2e_accumulated": {**accumulated, "micro_batch": micro}}  # fmt: skip
    print(f"one training step, {args.preset}, batch {steps['batch_size']}, {steps['image_size']} px, "
          f"{steps['precision']}, {steps['threads']} threads ({steps['device_name']}):")  # fmt: skip
    print(f"  {'step':<46} {'img/s':>9} {'step MiB':>9} {'/ e2e':>6}")
    named = [(f"greedy block {r['block']}", r["uncached"]) for r in steps["blocks"]]
    named += [(f"greedy block {r['block']}, recomputed", r["activations_recomputed"]) for r in steps["blocks"]]
    for r in steps.get("chunked_blocks", []):
        named += [(f"greedy block {r['block']}, chunked {args.block_chunks}", r["uncached"])]
        named += [(f"greedy block {r['block']}, chunked {args.block_chunks}, recomputed", r["activations_recomputed"])]
    named += [("end to end", e2e), ("end to end, recomputed", e2e["activations_recomputed"])]
    named += [(f"end to end, micro-batches of {micro} accumulated ({-(-batch // micro)} per step)", accumulated)]
    if steps["decoupled"]:  # measured with every block
        named += [("decoupled (all blocks)", steps["decoupled"])]
        named += [("decoupled, recomputed", steps["decoupled"]["activations_recomputed"])]
    for name, r in named:
        mib = (r["step_bytes"] or 0) / 2**20
        ratio = r["step_bytes"] / e2e["step_bytes"] if r["step_bytes"] and e2e["step_bytes"] else float("nan")
        print(f"  {name:<46} {r['images_per_s']:>9.1f} {mib:>9.1f} {ratio:>5.2f}x")
    if args.skip_training:
        return finish(result, args.json)

    processes = args.processes or J
    out = Path(args.out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for method in ("greedy", "decoupled", "pipelined", "e2e"):
        run = out / method
        if not (run / "summary.json").is_file():
            command = train_command(method, run, args.preset, args.epochs_per_block, J, cfg.train.lr_step, processes)
            subprocess.run(command, check=True, cwd=ROOT, env=env)
        result["training"][method] = {**summarize_run(run, args.target), "processes": processes if
                                      method == "pipelined" else 1, "run": str(run)}  # fmt: skip
    print(f"\ntraining, {J} x {args.epochs_per_block} epochs of data each, target {args.target:g} % val top-1:")
    print(f"  {'method':<10} {'procs':>5} {'epochs':>6} {'train s':>8} {'img/s':>7} {'s to target':>11} "
          f"{'last top-1':>10} {'ensemble':>8}")  # fmt: skip
    for method, r in result["training"].items():
        reached = f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] is not None else "not reached"
        figures = f"{r['last_top1']:>10.2f} {r['ensemble_top1']:>8.2f}"
        print(f"  {method:<10} {r['processes']:>5} {r['epochs']:>6} {r['train_seconds']:>8.1f} "
              f"{r['images_per_s']:>7.0f} {reached:>11} {figures}")  # fmt: skip
    return finish(result, args.json)


def finish(result: dict, path: str | None) -> int:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

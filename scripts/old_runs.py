"""Run directories written by an older commit, read by this one: resume, eval, export, predict and report.

    git worktree add /tmp/old <commit> --detach
    python scripts/old_runs.py --old /tmp/old OUT

With `--old`'s package (on PYTHONPATH), trains on the built-in sample: a greedy demo run and a decoupled one to the
end, and a demo run with train.ema interrupted in its second block (its last.pt in the older layout). Then, with
this checkout's package, it resumes the interrupted run, compares it with the same run trained here without a
break (final.pt and the metrics lines, timings aside), and runs eval, export (ONNX), predict and report on every
run. Prints one line per check and exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
SAMPLE = HERE / "layerwise" / "data" / "sample" / "cifar10-sample.tar.gz"
DEMO = ["--preset", "demo", "--device", "cpu", "--epochs-per-block", "1"]
EMA = ["--preset", "demo", "--device", "cpu", "--epochs-per-block", "2", "--set", "train.ema=0.9"]

INTERRUPTED = """
import sys
from layerwise.presets import resolve_config
from layerwise.config import parse_assignment
from layerwise.train import train

def stop(row):
    if row["stage"] == 1 and row["epoch"] == 1:
        raise KeyboardInterrupt

cfg = resolve_config("demo", None, [parse_assignment(a) for a in ("train.epochs_per_block=2", "train.ema=0.9",
                                                                   "train.device=cpu")])
try:
    train(cfg, sys.argv[1], on_epoch_end=stop)
except KeyboardInterrupt:
    pass
"""


def layerwise(args: list[str], tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-m", "layerwise", "-q", *args], env=env, capture_output=True, text=True)


def tensors(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def untimed(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the older commit")
    parser.add_argument("out", type=Path, help="a folder for the runs")
    args = parser.parse_args()
    old, out = args.old.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    images = out / "images"
    with tarfile.open(SAMPLE) as tar:  # a few of the sample's JPEGs, for predict
        members = [m for m in tar.getmembers() if m.isfile()][:4]
        tar.extractall(images, members=members, filter="data")
    runs = {"greedy": DEMO, "decoupled": [*DEMO, "--mode", "decoupled"]}
    failed = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failed
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail and not ok else ''}", flush=True)

    for name, flags in runs.items():
        done = layerwise(["train", *flags, "--out", str(out / name)], old)
        check(f"old commit trains {name}", done.returncode == 0, done.stderr[-500:])
    env = {**os.environ, "PYTHONPATH": str(old)}
    subprocess.run([sys.executable, "-c", INTERRUPTED, str(out / "ema")], env=env, check=True, capture_output=True)
    check("old commit leaves an interrupted ema run", not (out / "ema" / "checkpoints" / "final.pt").exists())

    resumed = layerwise(["train", "--out", str(out / "ema"), "--resume"], HERE)
    check("resume the old ema run", resumed.returncode == 0, resumed.stderr[-500:])
    whole = layerwise(["train", *EMA, "--out", str(out / "ema-here")], HERE)
    check("the same ema run here, without a break", whole.returncode == 0, whole.stderr[-500:])
    if resumed.returncode == 0 and whole.returncode == 0:
        a, b = tensors(out / "ema/checkpoints/final.pt"), tensors(out / "ema-here/checkpoints/final.pt")
        same = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
        check("resumed old run's final.pt equals the unbroken run's", same)
        check("and its metrics lines", untimed(out / "ema") == untimed(out / "ema-here"))
    for name in (*runs, "ema"):
        run = str(out / name)
        for what, command in (
            ("eval", ["eval", run, "--data", str(SAMPLE), "--device", "cpu"]),
            ("export", ["export", run, "--format", "onnx", "-o", str(out / f"{name}.onnx")]),
            ("predict", ["predict", run, str(images), "--device", "cpu"]),
            ("report", ["report", run, "-o", str(out / f"{name}.html")]),
        ):
            done = layerwise(command, HERE)
            check(f"{what} {name}", done.returncode == 0, (done.stderr or done.stdout)[-500:])
    shutil.rmtree(images)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The accuracy recipe, measured: each ingredient alone on top of the paper's recipe, the winners, their combination,
and end to end with both recipes, on the demo network and the built-in sample (docs/results.md, "A modern recipe").

    .venv/bin/python recipes/ablation.py [--jobs 2] [--phases screen,confirm,e2e,triple] [--root runs/ablation]

Resumable: a finished run (summary.json) is kept, an interrupted one resumed, so the same command continues where
it stopped. Runs go two at a time with one thread each (--jobs); the times in the table are of that set-up.

- screen: every ingredient alone, seeds 10 and 11 (never reported in the confirmed rows), plus the paper recipe.
  Test-time flip is scored on every saved run without retraining.
- choose: the winners are the ingredients whose mean gain in the last block's validation top-1 over the paper
  recipe on the screening seeds is positive, the best of each group of alternatives (two schedules, two mixings,
  two similarity weights, two epoch splits). The 3 largest are confirmed alone; all of them make the best recipe.
  The choice is written to ROOT/choice.json once and read back afterwards.
- confirm: the paper recipe, the 3 winners and the best recipe, seeds 0-3.
- e2e: end to end at the same 12 epochs, with the paper recipe (lr / 5 after 9 epochs, the greedy blocks' 3/4) and
  with the best recipe's ingredients that apply, seeds 0-3.
- triple: 3 times the budget (12 epochs per block, 36 end to end), paper and best, greedy and end to end, seeds 0-1.

`--table` prints the markdown table of every finished row.
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

INGREDIENTS: dict[str, list[str]] = {  # name: --set assignments on top of the demo preset (the paper's recipe)
    "paper": [],
    "label_smoothing": ["train.label_smoothing=0.1"],
    "nesterov": ["train.nesterov=true"],
    "cosine": ["train.schedule=cosine"],
    "one_cycle": ["train.schedule=triangle", "train.warmup_epochs=1"],
    "alternate_flip": ["data.flip=alternate"],
    "cutout": ["data.cutout=12"],
    "mixup": ["data.mix=mixup", "data.mix_alpha=0.2"],
    "cutmix": ["data.mix=cutmix", "data.mix_alpha=1.0"],
    "ema": ["train.ema=0.99"],
    "infopro_head": ["model.head=infopro"],
    "sim_1": ["train.sim_loss=1"],
    "sim_10": ["train.sim_loss=10"],
    "early_epochs": ["train.block_epochs=[5,4,3]"],
    "late_epochs": ["train.block_epochs=[3,4,5]"],
}
GROUPS = [["cosine", "one_cycle"], ["mixup", "cutmix"], ["sim_1", "sim_10"], ["early_epochs", "late_epochs"]]
SCREEN_SEEDS, CONFIRM_SEEDS, TRIPLE_SEEDS = (10, 11), (0, 1, 2, 3), (0, 1)


def scaled(settings: list[str], factor: int, whole: bool) -> list[str]:
    """The settings for `factor` times the epochs (warm-ups and epoch splits scaled alike); `whole`: for a stage
    of every block, whose epochs are the blocks' sum (so a split means nothing there and is dropped)."""
    out = []
    for s in settings:
        key, value = s.split("=", 1)
        if key == "train.block_epochs":
            if not whole:
                out.append(f"{key}=[{','.join(str(int(v) * factor) for v in value.strip('[]').split(','))}]")
        elif key == "train.warmup_epochs":
            out.append(f"{key}={float(value) * factor * (3 if whole else 1):g}")
        else:
            out.append(s)
    return out


def command(recipe: list[str], seed: int, mode: str, factor: int) -> list[str]:
    """The run's arguments. The step schedule's settings (lr_step, and epochs_per_block beside block_epochs) go only
    where they act: layerwise refuses a setting that does nothing."""
    epochs, step = 4 * factor, 3 * factor
    if mode == "e2e":
        epochs, step = 12 * factor, 9 * factor
    recipe = scaled(recipe, factor, mode == "e2e")
    stepped = not any(s.startswith("train.schedule=") and s != "train.schedule=step" for s in recipe)
    split = any(s.startswith("train.block_epochs=") for s in recipe)
    sets = [f"train.lr_step={step}"] * stepped + recipe
    args = ["--preset", "demo", "--seed", str(seed)] + ["--epochs-per-block", str(epochs)] * (stepped or not split)
    args += ["--mode", mode] if mode != "greedy" else []
    return args + [a for s in sets for a in ("--set", s)]


def cell(scores: list[dict], key: str, digits: int = 1) -> str:
    """Mean ± sample standard deviation over the seeds' runs."""
    values = [r[key] for r in scores if r.get(key) is not None]
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


class Ablation:
    def __init__(self, root: Path, jobs: int):
        self.root, self.jobs = root, jobs
        self.layerwise = [sys.executable, "-m", "layerwise", "-q"]

    def out(self, name: str, seed: int, mode: str = "greedy", factor: int = 1) -> Path:
        tag = "" if (mode, factor) == ("greedy", 1) else f"-{mode}{'' if factor == 1 else f'-x{factor}'}"
        return self.root / f"{name}{tag}-seed{seed}"

    def train(self, job: tuple[str, list[str], int, str, int]) -> None:
        name, recipe, seed, mode, factor = job
        out = self.out(name, seed, mode, factor)
        if (out / "summary.json").is_file():
            return
        resume = (out / "config.yaml").is_file()
        args = ["train", "--out", str(out)] + (["--resume"] if resume else command(recipe, seed, mode, factor))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.time()
        done = subprocess.run([*self.layerwise, *args], env=env, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"FAILED {out}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            return
        self.flip(out)
        print(f"{out.name}: {time.time() - t0:.0f} s", flush=True)

    def run(self, jobs: list[tuple[str, list[str], int, str, int]]) -> None:
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(self.train, jobs))

    def flip(self, out: Path) -> None:
        """Score the saved run's validation split with test-time flips (flip.json), without retraining."""
        if (out / "flip.json").is_file() or not (out / "summary.json").is_file():
            return
        done = subprocess.run([sys.executable, __file__, "--score-flip", str(out)], cwd=ROOT, capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode == 0:
            (out / "flip.json").write_text(done.stdout)
        else:
            print(f"flip scoring failed for {out}: {done.stderr.strip().splitlines()[-1:]}", flush=True)

    def score(self, out: Path) -> dict | None:
        if not (out / "summary.json").is_file():
            return None
        s = json.loads((out / "summary.json").read_text())
        row = {"last": s["final"]["val_top1"], "ensemble": s["final"]["val_ensemble_top1"],
               "seconds": s.get("train_seconds")}  # fmt: skip
        if (out / "flip.json").is_file():
            f = json.loads((out / "flip.json").read_text())["true"]
            row.update(last_flip=f["top1"], ensemble_flip=f["ensemble_top1"])
        return row

    def mean_last(self, name: str, seeds) -> float | None:
        scores = [self.score(self.out(name, s)) for s in seeds]
        return statistics.mean(r["last"] for r in scores) if all(scores) else None

    def choose(self) -> dict:
        path = self.root / "choice.json"
        if path.is_file():
            return json.loads(path.read_text())
        base = self.mean_last("paper", SCREEN_SEEDS)
        gains = {name: self.mean_last(name, SCREEN_SEEDS) - base for name in INGREDIENTS if name != "paper"}
        flips = [self.score(self.out(n, s)) for n in INGREDIENTS for s in SCREEN_SEEDS]
        flip_gain = statistics.mean(r["last_flip"] - r["last"] for r in flips)
        grouped = {n for g in GROUPS for n in g}
        candidates = [n for n in gains if n not in grouped] + [max(g, key=gains.get) for g in GROUPS]
        winners = sorted((n for n in candidates if gains[n] > 0), key=gains.get, reverse=True)
        best = [s for n in winners for s in INGREDIENTS[n]] + (["train.eval_flip=true"] if flip_gain > 0 else [])
        choice = {"gains": gains, "flip_gain": flip_gain, "winners": winners, "confirmed": winners[:3], "best": best}
        path.write_text(json.dumps(choice, indent=2) + "\n")
        return choice

    def phases(self, names: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if "screen" in names:
            self.run([(n, r, s, "greedy", 1) for s in SCREEN_SEEDS for n, r in INGREDIENTS.items()])
        if not {"confirm", "e2e", "triple"} & set(names):
            return
        choice = self.choose()
        print("winners:", choice["winners"], "best:", choice["best"], flush=True)
        best = [s for s in choice["best"] if s != "train.eval_flip=true"]  # flips are scored after training
        if "confirm" in names:
            rows = [("paper", []), *((n, INGREDIENTS[n]) for n in choice["confirmed"]), ("best", best)]
            self.run([(n, r, s, "greedy", 1) for s in CONFIRM_SEEDS for n, r in rows])
        if "e2e" in names:
            self.run([(n, r, s, "e2e", 1) for s in CONFIRM_SEEDS for n, r in (("paper", []), ("best", best))])
        if "triple" in names:
            jobs = [(n, r, s, m, 3) for m in ("greedy", "e2e") for s in TRIPLE_SEEDS for n, r in (("paper", []),
                    ("best", best))]  # fmt: skip
            self.run(jobs)

    def table(self) -> str:
        lines = ["| row | seeds | last block | ensemble | last, flip | ensemble, flip | train s |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        rows = [(n, SCREEN_SEEDS, "greedy", 1) for n in INGREDIENTS]
        rows += [(n, CONFIRM_SEEDS, "greedy", 1) for n in ["paper", *self.choose()["confirmed"], "best"]]
        rows += [(n, CONFIRM_SEEDS, "e2e", 1) for n in ("paper", "best")]
        rows += [(n, TRIPLE_SEEDS, m, 3) for m in ("greedy", "e2e") for n in ("paper", "best")]
        for name, seeds, mode, factor in rows:
            scores = [r for r in (self.score(self.out(name, s, mode, factor)) for s in seeds) if r]
            if not scores:
                continue

            what = name if (mode, factor) == ("greedy", 1) else f"{name}, {mode}{f' x{factor}' if factor > 1 else ''}"
            seen = ",".join(map(str, seeds)) + (f" ({len(scores)} done)" if len(scores) < len(seeds) else "")
            cells = [cell(scores, k) for k in ("last", "ensemble", "last_flip", "ensemble_flip")]
            lines.append(f"| {what} | {seen} | {' | '.join(cells)} | {cell(scores, 'seconds', 0)} |")
        return "\n".join(lines)


def score_flip(run: str) -> None:
    """Print the run's last head and ensemble validation top-1 without and with test-time flip (one thread)."""
    import torch

    from layerwise.data import build_data
    from layerwise.delivered import load_delivered
    from layerwise.device import precision_for
    from layerwise.evaluate import evaluate

    torch.set_num_threads(1)
    cpu = precision_for(torch.device("cpu"), "fp32")
    got = load_delivered(run, cpu)
    cfg, last = got.cfg, got.heads[-1]
    data = build_data(cfg.data, None, cfg.train.batch_size, cpu.device)
    out = {}
    for flip in (False, True):
        scored = evaluate(got.net.eval(), data.val, got.heads, cfg.train.ensemble, flip=flip)["blocks"][last]
        out[str(flip).lower()] = {"top1": scored["top1"], "ensemble_top1": scored["ensemble_top1"]}
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--phases", default="screen,confirm,e2e,triple")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--score-flip", metavar="RUN", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_flip:
        score_flip(args.score_flip)
        return
    ablation = Ablation(args.root, args.jobs)
    if args.table:
        print(ablation.table())
        return
    ablation.phases(args.phases.split(","))
    print(ablation.table())


if __name__ == "__main__":
    main()

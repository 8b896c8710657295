"""The table of recipes/methods_demo_scale.sh: per method, each block's validation top-1 and the ensemble's after
the last block, mean and spread (min-max) over the seeds, and the mean training seconds.

    python recipes/methods_table.py [runs/methods]
"""

import json
import statistics
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/methods")
methods: dict[str, list[dict]] = {}
for run in sorted(root.glob("*-seed*")):
    if (run / "summary.json").is_file():
        methods.setdefault(run.name.rsplit("-seed", 1)[0], []).append(json.loads((run / "summary.json").read_text()))


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"


print("| method | seeds | " + " | ".join(f"block {j} top-1" for j in range(3)) + " | ensemble top-1 | train s |")
print("|---|---|" + "---|" * 5)
for method, summaries in methods.items():
    by_block = [{b["block"]: b["val_top1"] for b in s["blocks"]} for s in summaries]  # end to end: the last only
    blocks = [[b.get(j) for b in by_block] for j in range(3)]
    per_block = [cell(b) if None not in b else "-" for b in blocks]
    ensemble = cell([s["final"]["val_ensemble_top1"] for s in summaries])
    seconds = statistics.mean(s["train_seconds"] for s in summaries)
    print(f"| {method} | {len(summaries)} | " + " | ".join(per_block) + f" | {ensemble} | {seconds:.0f} |")

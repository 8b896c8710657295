"""One JSON line for a step of recipes/device_check.sh: its exit status and time, and what it measured.

    python3 recipes/step_report.py NAME EXIT SECONDS LIMIT OUT_DIR      (LIMIT 0: the step had none)

Training steps report the run's summary (or, when the limit stopped them, how far they got); bench steps
report their images/s and, for the memory step, greedy block 0's memory against end to end's (the step's
memory plus the weights each keeps on the device; on a GPU also the measured peaks).
"""

import json
import sys
from pathlib import Path

from layerwise.rundir import RunDir

GOALS = {"k3-paper": ("seconds", 90.0), "memory-vgg11": ("memory_ratio", 0.5)}


def bench_json(text: str) -> dict | None:
    """The JSON object `layerwise bench --json` printed, among whatever else the step wrote."""
    start = text.find('{\n  "model"')
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[start:])[0]["model"]
    except (json.JSONDecodeError, KeyError):
        return None


def training(run: Path) -> dict:
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        blocks = {b["stage"]: round(b.get("val_top1", b.get("train_eval_top1", float("nan"))), 2) for b in s["blocks"]}
        return {
            "final": s["final"],
            "per_block_top1": blocks,
            "seconds_train_and_eval": round(s["wall_seconds_this_session"], 1),
            "no_validation": s.get("no_validation"),
        }
    rows = RunDir(run).read_metrics()  # none yet, or a line cut short by the time limit: skipped
    return {"epochs_done": len(rows), "seconds_so_far": round(sum(r["seconds"] for r in rows), 1)}


def bench(model: dict) -> dict:
    out = {"device": model["device_name"], "images_per_s": {}}
    for row in model["blocks"]:
        out["images_per_s"][f"block {row['block']}"] = round(row["uncached"]["images_per_s"], 1)
    out["images_per_s"]["e2e"] = round(model["e2e"]["images_per_s"], 1)
    first, e2e = model["blocks"][0], model["e2e"]

    def memory(row: dict) -> float | None:  # the step's memory with the weights the stage keeps on the device
        return row["step_bytes"] + row["weights_bytes"] if row["step_bytes"] is not None else None

    greedy, reference = memory(first["uncached"]), memory(e2e)
    if greedy and reference:
        out["memory_mib"] = {"greedy": round(greedy / 2**20, 1), "e2e": round(reference / 2**20, 1)}
        out["memory_ratio"] = round(greedy / reference, 3)
        lean = first.get("activations_recomputed")
        if lean and memory(lean):
            out["memory_ratio_recomputed"] = round(memory(lean) / reference, 3)
    if model["device"].startswith("cuda"):  # on the CPU the process's peak holds far more than the step
        out["peak_ratio"] = round(first["uncached"]["peak_bytes"] / e2e["peak_bytes"], 3)
    return out


def main() -> None:
    name, code, seconds, limit, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    report = {"step": name, "exit": code, "seconds": seconds, "limit_s": limit, "timed_out": code in (124, 137)}
    log = Path(out) / f"{name}.txt"
    text = log.read_text(errors="replace") if log.is_file() else ""
    run = Path(out) / "runs" / name
    if run.exists():
        report.update(training(run))
    elif (model := bench_json(text)) is not None:
        report.update(bench(model))
    elif text.strip():
        report["last_line"] = text.strip().splitlines()[-1][-300:]
    if name in GOALS:
        key, goal = GOALS[name]
        value = report.get("seconds_train_and_eval" if key == "seconds" else key)
        report["goal"] = {key: goal, "met": None if value is None else value <= goal}
    print(json.dumps(report))


if __name__ == "__main__":
    main()

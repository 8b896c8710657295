"""A run's summary (summary.json): each stage's last epoch, the delivered network's scores and sizes, and the
table and log lines that show them."""

from __future__ import annotations

import itertools
from typing import Any

from layerwise.config import RunConfig
from layerwise.errors import LayerwiseError
from layerwise.models.staged import StagedNet, count


def format_row(row: dict[str, Any]) -> str:
    scored, key = next(((name, key) for name, key in SCORED if key in row), ("", None))
    v = row[key] if key else None
    scores = f"{scored} top-1 {v['top1']:.2f} top-5 {v['top5']:.2f} ensemble {v['ensemble_top1']:.2f} " if v else ""
    if v and "blocks" in row:  # decoupled: every block's own head
        scores += "(blocks " + " / ".join(f"{b[key]['top1']:.1f}" for b in row["blocks"]) + ") "
    return (
        f"{row['stage_name']} epoch {row['epoch']}: loss {row['loss']:.3f} train top-1 {row['train']['top1']:.1f} "
        f"{scores}({row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s)"
    )


TRAIN_EVAL = "train_eval (t_ev), the fixed subset of training images scored without augmentation"
SCORED = (("val", "val"), ("train-eval", "train_eval"))
"""What a run's per-epoch scores are on, best first: validation, else the clean training subset (train_eval)."""


def summarize(cfg: RunConfig, net: StagedNet, rows: list[dict], stages, seconds: float, device) -> dict[str, Any]:
    """Per-block results (each stage's last epoch), the final network's numbers and the paper's targets."""
    per_stage = []
    for stage in stages:
        mine = [r for r in rows if r["stage"] == stage.index]
        if not mine:
            raise LayerwiseError(
                f"metrics.jsonl has no line for {stage.name}, which the checkpoints cover; the summary cannot be "
                "written (the trained weights are in checkpoints/)"
            )
        last = mine[-1]
        stage_seconds = sum(r["seconds"] for r in mine)
        # a decoupled stage trains every block at once: one entry per block, from its own figures (row["blocks"])
        for part in last.get("blocks") or [last]:
            entry = {
                "stage": f"block {part['block']}" if "blocks" in last else stage.name,
                "block": part["block"],
                "downsample": net.downsamples[part["block"]],
                **{f"val_{k}": v for k, v in part.get("val", {}).items()},
                "train_top1": part["train"]["top1"],
                "train_loss": part["loss"],
                "seconds": stage_seconds,
            }
            if "train_eval" in part:
                entry.update({f"train_eval_{k}": v for k, v in part["train_eval"].items()})
            per_stage.append(entry)
    # Proposition 3.1: with P_j = Id the best risk cannot grow from one block to the next. Compared on the
    # clean training subset (eval mode, final weights) when there is one, else on the epoch's running loss.
    risk = "train_eval_loss" if all("train_eval_loss" in e for e in per_stage) else "train_loss"
    for prev, cur in itertools.pairwise(per_stage):
        if not cur["downsample"]:
            cur["improves_on_previous"] = cur[risk] <= prev[risk]
    final = per_stage[-1]
    scored = next((key for _, key in SCORED if f"{key}_top1" in final), None)
    summary = {
        "preset": cfg.preset,
        "mode": cfg.train.mode,
        "device": str(device),
        "blocks": per_stage,
        "final": final_scores(final),
        "params_final": net.final_parameters(),
        "params_heads": net.head_parameters(),
        "parameters": {"blocks": [count(b) for b in net.blocks], "heads": [count(h) for h in net.heads]},
        "train_seconds": sum(r["seconds"] for r in rows),
        "wall_seconds_this_session": seconds,
        "paper": cfg.paper,
    }
    if scored != "val":  # say so: these are not validation figures
        what = TRAIN_EVAL if scored else "the augmented training batches"
        summary["no_validation"] = f"data.val_size=0 and no data.val_path; the figures are on {what}"
    return summary


def final_scores(entry: dict[str, Any]) -> dict[str, float]:
    """A summary block entry's scores: validation, else train_eval, else the running training top-1."""
    scored = next((key for _, key in SCORED if f"{key}_top1" in entry), None)
    if scored is None:
        return {"train_top1": entry["train_top1"]}
    return {f"{scored}_{k}": entry[f"{scored}_{k}"] for k in ("top1", "top5", "ensemble_top1", "ensemble_top5")}


def summary_table(summary: dict[str, Any]) -> str:
    scored = next((key for _, key in SCORED if f"{key}_top1" in summary["blocks"][-1]), None)
    first = {"val": "val top-1", "train_eval": "t_ev top-1"}.get(scored)
    columns = (*((first, "top-5", "ens top-1", "ens top-5") if scored else ()), "train top-1", "time s")
    header = f"{'stage':<10} " + " ".join(f"{c:>{max(len(c), 7)}}" for c in columns)
    lines = [header, "-" * len(header)]
    for b in summary["blocks"]:
        cells = ""
        if scored:
            cells = (
                f"{b[f'{scored}_top1']:>9.2f} {b[f'{scored}_top5']:>7.2f} {b[f'{scored}_ensemble_top1']:>9.2f} "
                f"{b[f'{scored}_ensemble_top5']:>9.2f} "
            )
        lines.append(f"{b['stage']:<10} {cells}{b['train_top1']:>11.2f} {b['seconds']:>7.1f}")
    if "no_validation" in summary:
        lines.append(f"no validation: {summary['no_validation']}")
    if "adaptive_depth" in summary:
        lines.append(f"adaptive depth: {summary['adaptive_depth']['reason']}")
    if summary.get("paper"):
        lines.append("paper: " + ", ".join(f"{k} {v:g}" for k, v in summary["paper"].items()))
    return "\n".join(lines)

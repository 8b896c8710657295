"""A run's figures: each epoch's metrics line (metrics.jsonl), its TensorBoard scalars (train.tensorboard), and
the summary (summary.json: each stage's last epoch, the delivered network's scores and sizes), with the table and
log lines that show them."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from layerwise.config import METHOD_HEADS, RunConfig
from layerwise.errors import LayerwiseError
from layerwise.models.staged import StagedNet, count
from layerwise.safe_io import folder
from layerwise.stages import Stage


def epoch_row(stage: Stage, epoch: int, lr: float, stats: dict, scored: dict[str, dict]) -> dict[str, Any]:
    """One metrics line: the stage's last loss head's training figures (`stats`, train_epoch's) and its `scored`
    evaluations ({"val" or "train_eval": evaluate's result}, with the ensemble over the stage's heads). A stage
    with several loss heads (decoupled) adds every block's figures under "blocks" (schema: docs/decisions.md)."""

    def scores(j: int) -> dict[str, Any]:
        # a head that does not classify is not scored (evaluate leaves it out)
        return {k: {**r["blocks"][j], "loss": r["losses"][j]} for k, r in scored.items() if j in r["blocks"]}

    row = {
        "stage": stage.index,
        "stage_name": stage.name,
        "block": stage.block,
        "epoch": epoch + 1,
        "lr": lr,
        "loss": stats["loss"],
        "train": {"top1": stats["top1"], "top5": stats["top5"]},
        **{k: v for k, v in scores(stage.block).items() if k == "val"},
        "images_per_s": stats["images_per_s"],
        "seconds": stats["seconds"],
        **{k: v for k, v in scores(stage.block).items() if k == "train_eval"},  # the lines' order of old
    }
    if "heads" in stats:
        row["blocks"] = [
            {"block": j, "lr": lr, "loss": figures["loss"],
             "train": {"top1": figures["top1"], "top5": figures["top5"]}, **scores(j),
             **{k: v for k, v in figures.items() if k not in ("loss", "top1", "top5")}}
            for j, figures in stats["heads"].items()
        ]  # fmt: skip
    return row


class Callback:
    """A function of each epoch's metrics line, as a sink (train's `on_epoch_end`)."""

    def __init__(self, function):
        self.add = function

    def close(self) -> None:
        pass


def sinks(cfg: RunConfig, run: Path, main: bool, epochs_done: int) -> list:
    """Where each epoch's metrics line goes besides metrics.jsonl: TensorBoard (train.tensorboard, rank 0).
    A sink has add(row) and close()."""
    return [Board(run, epochs_done)] if cfg.train.tensorboard and main else []


class Board:
    """train.tensorboard: each epoch's metrics line as scalars in RUN/tensorboard (torch.utils.tensorboard), at
    step = the run's epoch count. Tags: loss/train, top1/train, lr, images_per_s; loss/S, top1/S and
    ensemble_top1/S for S = val and train_eval; a decoupled run adds top1/S/block j for each block."""

    @staticmethod
    def check() -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise LayerwiseError(
                "train.tensorboard needs the tensorboard package: pip install 'layerwise[tensorboard]'"
            ) from None

    def __init__(self, run: Path, epochs_done: int):
        from torch.utils.tensorboard import SummaryWriter

        with folder(run, "tensorboard", create=True):  # a real folder of the run, never a link out of it
            pass
        # events at steps >= epochs_done are of epochs a resumed run trains again: TensorBoard drops them
        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=epochs_done)
        self.step = epochs_done

    def add(self, row: dict[str, Any]) -> None:
        scalars = {"loss/train": row["loss"], "top1/train": row["train"]["top1"], "lr": row["lr"],
                   "images_per_s": row["images_per_s"]}  # fmt: skip
        for key in ("val", "train_eval"):
            if key in row:
                scalars.update({f"loss/{key}": row[key]["loss"], f"top1/{key}": row[key]["top1"],
                                f"ensemble_top1/{key}": row[key]["ensemble_top1"]})  # fmt: skip
            for block in row.get("blocks", []):
                if key in block:
                    scalars[f"top1/{key}/block {block['block']}"] = block[key]["top1"]
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, self.step)
        self.writer.flush()
        self.step += 1

    def close(self) -> None:
        self.writer.close()


def format_row(row: dict[str, Any]) -> str:
    scored, key = next(((name, key) for name, key in SCORED if key in row), ("", None))
    v = row[key] if key else None
    scores = f"{scored} top-1 {v['top1']:.2f} top-5 {v['top5']:.2f} ensemble {v['ensemble_top1']:.2f} " if v else ""
    if v and "blocks" in row:  # decoupled: every block's own head
        scores += "(blocks " + " / ".join(f"{b[key]['top1']:.1f}" if key in b else "-" for b in row["blocks"]) + ") "
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
    comparable = cfg.model.head not in METHOD_HEADS  # a method's local losses differ in kind between blocks
    for prev, cur in itertools.pairwise(per_stage if comparable else []):
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
    counted = [r["data"] for r in rows if "data" in r]  # sharded data's repeats, drops and skipped samples
    if counted:
        summary["data"] = {k: sum(c[k] for c in counted) for k in counted[0]}
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


def cell(value: float | None, width: int) -> str:
    """A figure to two decimals in `width` characters, or "-" for none."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.2f}"


def summary_table(summary: dict[str, Any]) -> str:
    scored = next((key for _, key in SCORED if f"{key}_top1" in summary["blocks"][-1]), None)
    first = {"val": "val top-1", "train_eval": "t_ev top-1"}.get(scored)
    columns = (*((first, "top-5", "ens top-1", "ens top-5") if scored else ()), "train top-1", "time s")
    header = f"{'stage':<10} " + " ".join(f"{c:>{max(len(c), 7)}}" for c in columns)
    lines = [header, "-" * len(header)]
    for b in summary["blocks"]:
        cells = ""
        if scored:  # a head that does not classify has no scores: "-"
            widths = {"top1": 9, "top5": 7, "ensemble_top1": 9, "ensemble_top5": 9}
            cells = "".join(f"{cell(b.get(f'{scored}_{k}'), w)} " for k, w in widths.items())
        lines.append(f"{b['stage']:<10} {cells}{cell(b['train_top1'], 11)} {b['seconds']:>7.1f}")
    if "no_validation" in summary:
        lines.append(f"no validation: {summary['no_validation']}")
    if "adaptive_depth" in summary:
        lines.append(f"adaptive depth: {summary['adaptive_depth']['reason']}")
    if summary.get("paper"):
        lines.append("paper: " + ", ".join(f"{k} {v:g}" for k, v in summary["paper"].items()))
    return "\n".join(lines)

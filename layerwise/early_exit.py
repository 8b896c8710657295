"""Early exit (anytime inference): each image is answered by the first head whose top softmax probability
reaches a threshold t, one t for all heads, calibrated on the run's own validation split.

Exiting at head j costs blocks 0..j and heads 0..j (every earlier head was checked and was not confident
enough); the costs are multiply-adds counted from the network (torch.utils.flop_counter on the meta device).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from layerwise.config import RunConfig, config_from_dict
from layerwise.data import build_data, build_eval_loader
from layerwise.device import Precision, precision_for, resolve_device
from layerwise.errors import LayerwiseError
from layerwise.models.partition import flops_per_image
from layerwise.models.staged import StagedNet

if TYPE_CHECKING:
    from layerwise.delivered import Delivered

TOLERANCE = 0.5
"""Points of top-1 the calibrated threshold may lose against the last head, on the validation split."""


def exit_macs(cfg: RunConfig, classes: int, heads: list[int]) -> tuple[list[float], float]:
    """Multiply-adds per image of answering at each of `heads` (the blocks up to it and every head up to it), and
    of the network without exits (every block up to the last head, and that head alone)."""
    block_flops, head_flops = flops_per_image(cfg.model, classes, cfg.data.image_size)
    per_block, per_head = [f / 2 for f in block_flops], [f / 2 for f in head_flops]  # multiply-adds
    last = heads[-1]
    exits = [sum(per_block[: j + 1]) + sum(per_head[h] for h in heads if h <= j) for j in heads]
    return exits, sum(per_block[: last + 1]) + per_head[last]


@torch.no_grad()
def confidences(net: StagedNet, loader, heads: list[int], autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) top softmax probability of each head for each image, and (N, H) whether that head is right."""
    net.eval()
    confidence, correct = [], []
    for x, y in loader.batches():
        with autocast():
            logits = net(x, upto=max(heads), heads=heads)
        probs = torch.stack([z.float().softmax(-1) for z in logits], 1)  # (B, H, classes)
        top, guess = probs.max(-1)
        confidence.append(top.cpu())
        correct.append((guess == y[:, None]).cpu())
    return torch.cat(confidence), torch.cat(correct)


def exits(confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) index of the answering head: the first at or above the threshold, else the last."""
    sure = confidence >= threshold
    sure[:, -1] = True
    return sure.float().argmax(1)  # the first True


def score(confidence: torch.Tensor, correct: torch.Tensor, macs: list[float], threshold: float) -> dict[str, Any]:
    exit_at = exits(confidence, threshold)
    right = correct.gather(1, exit_at[:, None]).float().mean().item()
    cost = torch.tensor(macs, dtype=torch.float64)[exit_at].mean().item()
    counts = torch.bincount(exit_at, minlength=len(macs)).tolist()
    return {"threshold": threshold, "top1": 100 * right, "macs": cost, "exits_per_head": counts}


def without_exits(correct: torch.Tensor, alone: float) -> dict[str, Any]:
    """The last head alone, as a network without exits runs it: no earlier head is computed."""
    counts = [0] * (correct.shape[1] - 1) + [correct.shape[0]]
    top1 = 100 * correct[:, -1].float().mean().item()
    return {"threshold": None, "top1": top1, "macs": alone, "exits_per_head": counts}


def calibrate(confidence: torch.Tensor, correct: torch.Tensor, macs: list[float], alone: float) -> dict[str, Any]:
    """The threshold with the least average compute whose top-1 is within TOLERANCE points of the last head's, or
    (threshold None) no early exit, when no threshold within the tolerance costs less than the last head alone.

    Candidates are the earlier heads' confidences (at most 1,000 of them, evenly spaced in rank)."""
    plain = without_exits(correct, alone)
    candidates = confidence[:, :-1].flatten().unique()
    if len(candidates) > 1000:
        candidates = candidates[torch.linspace(0, len(candidates) - 1, 1000).long()]
    best = plain
    for t in candidates.tolist():
        s = score(confidence, correct, macs, t)
        if s["top1"] >= plain["top1"] - TOLERANCE and s["macs"] < best["macs"]:
            best = s
    return {**best, "last_head_top1": plain["top1"]}


def analyse(got: Delivered, run_data: Any, data: Any, compute: Precision, batch_size: int = 256) -> dict[str, Any]:
    """Calibrate t on the run's validation split, then the accuracy/compute curve and t's result on `data`."""
    cfg, net, heads, classes = got.cfg, got.net, got.heads, got.classes
    if len(heads) < 2:
        raise LayerwiseError(
            "early exit needs two heads that classify or more; this run delivers one (end to end, one block, or "
            "a method whose other heads give no class scores)"
        )
    if cfg.data.val_path is not None and Path(cfg.data.val_path).resolve() == Path(data).resolve():
        raise LayerwiseError(
            f"{data} is the run's own validation data (data.val_path), where early exit calibrates its threshold; "
            "score other data"
        )
    bundle = build_data(cfg.data, run_data, batch_size, compute.device)
    if bundle.val is None:
        raise LayerwiseError(
            "early exit calibrates on the run's validation split, and this run has none (data.val_size=0)"
        )
    macs, alone = exit_macs(cfg, len(classes), heads)
    chosen = calibrate(*confidences(net, bundle.val, heads, compute.autocast), macs, alone)
    loader = build_eval_loader(cfg.data, data, classes, batch_size, compute.device)
    confidence, correct = confidences(net, loader, heads, compute.autocast)
    t = chosen["threshold"]
    grid = sorted({i / 50 for i in range(51)} | ({t} if t is not None else set()))
    last = without_exits(correct, alone)
    return {
        "data": str(data),
        "checkpoint": str(got.checkpoint),
        "checkpoint_mtime_ns": got.checkpoint.stat().st_mtime_ns,
        "heads": heads,
        "macs_per_exit": macs,
        "macs_without_exits": alone,
        "tolerance_points": TOLERANCE,
        "calibrated_on": f"the run's validation split ({bundle.val_images} images)",
        "calibration": chosen,
        "at_threshold": last if t is None else score(confidence, correct, macs, t),
        "last_head": last,
        "curve": [score(confidence, correct, macs, g) for g in grid],
    }


def early_exit_run(
    run_dir: str | Path, data: str | Path, device: str = "auto", precision: str | None = None, batch_size: int = 256
) -> dict[str, Any]:
    """`layerwise eval RUN --data D --early-exit`: the analysis, saved in RUN/early_exit.json by data path
    (best effort: a run directory that cannot be written still gets its result)."""
    from layerwise.delivered import load_delivered
    from layerwise.rundir import RunDir

    cfg = config_from_dict(RunDir(run_dir).saved_config())
    compute = precision_for(resolve_device(device), precision or cfg.train.precision)
    got = load_delivered(run_dir, compute)
    result = analyse(got, got.run.read_info().get("data_path"), data, compute, batch_size)
    got.run.record(got.run.path / "early_exit.json", str(Path(data).resolve()), result)
    return result

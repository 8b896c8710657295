"""A run's network: built and checked before anything is written (checked_model), and as a finished or
interrupted run delivers it (load_delivered) to `eval`, `export`, `predict` and early exit.

Serving code imports this module, never the training orchestrator (layerwise.train.run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from layerwise.config import RunConfig, config_from_dict
from layerwise.data import build_eval_loader
from layerwise.device import Precision, precision_for, resolve_device
from layerwise.errors import LayerwiseError
from layerwise.evaluate import evaluate
from layerwise.models import build_model
from layerwise.models.blocks import set_recompute
from layerwise.models.staged import StagedNet
from layerwise.sizing import check_size
from layerwise.train.checkpoint import RunDir, load_checkpoint
from layerwise.train.stage import place_for, plan_stages
from layerwise.trust import check_trusted


def checked_model(
    cfg: RunConfig,
    num_classes: int,
    precision: Precision,
    state: dict | None = None,
    mode: str | None = None,
    processes: int = 1,
) -> StagedNet:
    """Size the network on the meta device (sizing.check_size; with a `mode`, also a training step's activations
    for the batch share of each of `processes`), then build it (channels_last where the precision says), load
    `state` if given, and run one blank image through every block and head on the CPU, all before anything is
    written: problems become one line.

    Then the whole network goes to the device, or with a `mode` only what that strategy's first stage runs
    (place_for).
    """
    size, channels, device = cfg.data.image_size, cfg.model.in_channels, precision.device
    check_size(cfg, num_classes, device, None if mode is None else cfg.train.batch_size // max(1, processes), mode)
    try:
        net = build_model(cfg.model, num_classes, size)
        set_recompute(net, cfg.train.recompute_activations)
        if state is not None:
            net.load_state_dict(state)
        if precision.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.downsamples = downsamples(net, torch.zeros(1, channels, size, size))
    except (RuntimeError, ValueError) as e:
        raise LayerwiseError(
            f"the model cannot be built or run on {channels}x{size}x{size} inputs ({str(e).splitlines()[0][:200]}); "
            "check the model settings and data.image_size"
            + ("; or the checkpoint is not this network's" if state is not None else "")
        ) from None
    try:
        if mode is None:
            return net.to(device)
        place_for(net, plan_stages(net.J, mode)[0], device)
    except torch.OutOfMemoryError:
        raise LayerwiseError(f"the network's weights do not fit in the memory of {device}") from None
    return net


@torch.no_grad()
def downsamples(net: StagedNet, x: torch.Tensor) -> list[bool]:
    """Run x through every block and head (eval mode); which blocks make the map smaller."""
    net.eval()
    out = []
    for block, head in zip(net.blocks, net.heads, strict=True):
        y = block(x)
        head(y)
        smaller = x.dim() == y.dim() == 4 and (y.shape[-2] < x.shape[-2] or y.shape[-1] < x.shape[-1])
        out.append(bool(smaller))
        x = y
    return out


@dataclass
class Delivered:
    """A run's trained network as it stands: final.pt when finished, else the last epoch's checkpoint."""

    run: RunDir
    cfg: RunConfig
    classes: list[str]
    net: StagedNet
    heads: list[int]
    """The heads trained so far (of the delivered blocks, when train.min_gain stopped the run early)."""
    checkpoint: Path


def load_delivered(run_dir: str | Path, compute: Precision) -> Delivered:
    run = RunDir(run_dir)
    cfg = config_from_dict(run.saved_config())
    classes = run.read_classes()
    path = run.final if run.final.is_file() else run.last
    if not path.is_file():
        raise LayerwiseError(f"{run.path} has no checkpoint yet; train at least one epoch first")
    check_trusted(cfg.model, f"run directory {run.path}")
    meta, state, optimizer = load_checkpoint(path)
    average = optimizer.get("average") if isinstance(optimizer, dict) and path == run.last else None
    if isinstance(average, dict) and isinstance(average.get("tensors"), dict):  # train.ema mid-stage: its average
        state = {**state, **{k: v for k, v in average["tensors"].items() if k in state}}
    net = checked_model(cfg, len(classes), compute, state)
    stages = plan_stages(net.J, cfg.train.mode)
    heads = list(stages[-1 if path == run.final else meta["stage"]].eval_heads)
    if path == run.final:
        heads = [j for j in heads if j < meta.get("blocks_trained", net.J)]
    return Delivered(run, cfg, classes, net, heads, path)


def evaluate_run(
    run_dir, data, device: str = "auto", batch_size: int = 256, precision: str | None = None, flip: bool = False
) -> dict:
    """Score a run's trained heads on data no one trained on, mapping its classes by name (with `flip`, each
    head's logits averaged with the mirrored image's), and save the result in the run's eval.json (by data
    path)."""
    cfg = config_from_dict(RunDir(run_dir).saved_config())
    compute = precision_for(resolve_device(device), precision or cfg.train.precision)
    got = load_delivered(run_dir, compute)
    loader = build_eval_loader(cfg.data, data, got.classes, batch_size, compute.device)
    result = {**evaluate(got.net, loader, got.heads, cfg.train.ensemble, compute.autocast, flip=flip), "flip": flip}
    result.update(checkpoint=str(got.checkpoint), data=str(data))
    key = str(Path(data).resolve()) + (" (flip)" if flip else "")  # a flipped evaluation beside the plain one
    got.run.record(got.run.evals, key, result)  # for `layerwise report`
    return result

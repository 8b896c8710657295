"""A run's network as a finished or interrupted run delivers it (load_delivered) to `eval`, `export`, `predict`
and early exit. Serving imports nothing from layerwise.train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerwise.config import RunConfig, config_from_dict
from layerwise.data import build_eval_loader
from layerwise.device import Precision, precision_for, resolve_device
from layerwise.errors import LayerwiseError
from layerwise.evaluate import evaluate
from layerwise.models.staged import StagedNet
from layerwise.network import checked_model
from layerwise.rundir import RunDir, read_checkpoint
from layerwise.stages import plan_stages
from layerwise.trust import check_trusted


@dataclass
class Delivered:
    """A run's trained network as it stands: final.pt when finished, else the last epoch's checkpoint."""

    run: RunDir
    cfg: RunConfig
    classes: list[str]
    net: StagedNet
    heads: list[int]
    """The heads trained so far that classify (of the delivered blocks, when train.min_gain stopped the run early);
    a method's head that gives no class scores (InfoPro's contrastive projection) is not among them."""
    checkpoint: Path


def load_delivered(run_dir: str | Path, compute: Precision) -> Delivered:
    run = RunDir(run_dir)
    cfg = config_from_dict(run.saved_config())
    classes = run.read_classes()
    path = run.final if run.final.is_file() else run.last
    if not path.is_file():
        raise LayerwiseError(f"{run.path} has no checkpoint yet; train at least one epoch first")
    check_trusted(cfg.model, f"run directory {run.path}")
    meta, state, _, average = read_checkpoint(path)
    average = average if path == run.last else None
    if isinstance(average, dict) and isinstance(average.get("tensors"), dict):  # train.ema mid-stage: its average
        state = {**state, **{k: v for k, v in average["tensors"].items() if k in state}}
    net = checked_model(cfg, len(classes), compute, state)
    stages = plan_stages(net.J, cfg.train.mode)
    heads = [j for j in stages[-1 if path == run.final else meta["stage"]].eval_heads if j in net.classifying]
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
    silent = [j for j in range(max(got.heads, default=-1) + 1) if j not in got.net.classifying]
    if silent:  # InfoPro Contrast's projections, or a module without a task loss: nothing to score
        result["not_classifying"] = silent
    key = str(Path(data).resolve()) + (" (flip)" if flip else "")  # a flipped evaluation beside the plain one
    got.run.record(got.run.evals, key, result)  # for `layerwise report`
    return result

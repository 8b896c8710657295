"""A whole training run: data, model, every stage of the strategy, metrics, checkpoints and resume."""

from __future__ import annotations

import copy
import itertools
import logging
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from layerwise import __version__
from layerwise.config import RunConfig, config_from_dict
from layerwise.data import build_data, build_eval_loader
from layerwise.data.loaders import MemoryLoader
from layerwise.device import channels_last, fast_path, resolve_device
from layerwise.errors import LayerwiseError
from layerwise.evaluate import evaluate
from layerwise.models.blocks import set_recompute
from layerwise.models.staged import StagedNet, build_model
from layerwise.train.cache import PrefixCache, cache_bytes, cache_dtype, check_cache_fits, human, prefix_shapes
from layerwise.train.checkpoint import BackgroundWriter, RunDir, cpu_snapshot, load_checkpoint, save_checkpoint
from layerwise.train.loop import (
    Stage,
    compiled_loss,
    load_optimizer_state,
    make_optimizer,
    module_bytes,
    place_for,
    plan_stages,
    resident_modules,
    start_epoch,
    train_epoch,
    trainable_modules,
)

log = logging.getLogger("layerwise")


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """Each epoch's randomness (shuffle, augmentation, dropout) depends only on these, so resume is exact."""
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**63)


RESUMABLE_CHANGES = ("device", "precision", "recompute_activations", "compile")
"""Settings a resumed run may change: they decide how the same training is computed, not what it is."""


def same_run(saved: dict[str, Any], cfg: RunConfig) -> None:
    """Refuse to resume a run under a different config, except for RESUMABLE_CHANGES."""
    ours = cfg.to_dict()
    theirs = config_from_dict(saved).to_dict()
    for section in ("model", "data", "train"):
        for key, value in ours[section].items():
            if key not in RESUMABLE_CHANGES and theirs[section].get(key) != value:
                raise LayerwiseError(
                    f"--resume: {section}.{key} is {value!r} but the run used {theirs[section].get(key)!r}; "
                    "drop the override or start a new run with another --out"
                )


def train(
    cfg: RunConfig,
    out: str | Path,
    data: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train cfg's network into the run directory `out` and return the summary. See RunDir for the files.

    `data` is a dataset path (None: the built-in sample). With `resume`, an interrupted run continues from
    its last finished epoch and ends exactly where an uninterrupted run would.
    """
    run = RunDir(out)
    if resume:
        same_run(run.saved_config(), cfg)
        if data is None:  # continue on the data the run started with
            data = run.read_info().get("data_path")
    else:
        run.check_new()
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    bundle = build_data(cfg.data, data, cfg.train.batch_size, device, cfg.train.train_eval_size)
    log.info(
        "data: %s; %d train, %d val images", bundle.description, bundle.train.num_examples, bundle.val.num_examples
    )

    stages = plan_stages(cfg.model.J, cfg.train.mode)
    net = checked_model(cfg, len(bundle.classes), device, stage=stages[0])
    autocast = fast_path(device, cfg.train.precision)
    use_cache = cfg.train.cache != "none" and cfg.train.mode == "greedy" and cfg.model.J > 1
    if use_cache:
        plan_prefix_cache(cfg, net, bundle.train, device, run.path / "cache", autocast)

    if resume:
        if run.read_classes() != bundle.classes:
            raise LayerwiseError(
                f"--resume: the data's classes differ from the run's {run.classes}; pass the same --data"
            )
    else:
        run.create(cfg.to_yaml())
        run.write_json(run.classes, bundle.classes)
    info = run_info(cfg, device, data, bundle.description)
    if resume:  # keep when the run started; note when it was resumed
        old = run.read_info()
        info = {**info, "started": old.get("started"), "resumed": [*old.get("resumed", []), info["started"]]}
    run.write_json(run.info, info)
    handler = logging.FileHandler(run.path / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    try:
        return _train_stages(cfg, run, net, stages, bundle, device, autocast, use_cache, resume, on_epoch_end)
    finally:
        log.removeHandler(handler)
        handler.close()


def resume_point(cfg: RunConfig, run: RunDir, net: StagedNet, n_stages: int) -> tuple[int, int, dict | None]:
    """Load the newest checkpoint into net; return (stage, epoch, optimizer state) to continue from.

    final.pt (finished) > last.pt (end of an epoch) > the newest block{j}.pt (end of a greedy block).
    Metric lines the checkpoint does not cover are dropped.
    """
    if run.final.is_file():
        _, model_state, _ = load_checkpoint(run.final)
        net.load_state_dict(model_state)
        log.info("%s already finished; rewriting its summary", run.path)
        return n_stages, 0, None
    if run.last.is_file():
        meta, model_state, optimizer_state = load_checkpoint(run.last)
        net.load_state_dict(model_state)
        stage, epoch = meta["stage"], meta["epoch"]
        run.keep_metrics(lambda r: (r["stage"], r["epoch"]) <= (stage, epoch))
        log.info("resuming %s after stage %d epoch %d", run.path, stage, epoch)
        if epoch < cfg.train.epochs_per_block:
            return stage, epoch, optimizer_state
        if cfg.train.mode == "greedy" and not run.block(meta["block"]).is_file():  # stopped before saving it
            save_checkpoint(run.block(meta["block"]), {"block": meta["block"], "stage": stage}, model_state)
        return stage + 1, 0, None
    block = run.last_finished_block()
    if block is not None:  # last.pt was lost: continue after the last finished block
        meta, model_state, _ = load_checkpoint(block)
        net.load_state_dict(model_state)
        run.keep_metrics(lambda r: r["stage"] <= meta["stage"])
        log.info("resuming %s after %s (no last.pt)", run.path, block.name)
        return meta["stage"] + 1, 0, None
    run.keep_metrics(lambda r: False)
    log.info("no checkpoint in %s yet: starting from the beginning", run.checkpoints)
    return 0, 0, None


def _train_stages(cfg, run, net, stages, bundle, device, autocast, use_cache, resume, on_epoch_end) -> dict[str, Any]:
    """Every stage from where the run stands (its newest checkpoint when resuming) to the end."""
    first_stage, first_epoch, optimizer_state = resume_point(cfg, run, net, len(stages)) if resume else (0, 0, None)
    t_start = time.perf_counter()
    with BackgroundWriter() as writer:  # checkpoints and metrics go to disk while the next epoch trains
        for s in range(first_stage, len(stages)):
            resumed = (first_epoch, optimizer_state) if s == first_stage else (0, None)
            train_stage(
                cfg, run, net, stages[s], s, *resumed, bundle, device, autocast, use_cache, writer, on_epoch_end
            )
            if cfg.train.mode == "greedy":
                save_later(writer, run.block(stages[s].block), {"block": stages[s].block, "stage": s}, net)
        if first_stage < len(stages) or not run.final.is_file():
            save_later(writer, run.final, {"mode": cfg.train.mode, "blocks_trained": cfg.model.J}, net)
    summary = summarize(cfg, net, run.read_metrics(), stages, time.perf_counter() - t_start, device)
    run.write_json(run.summary, summary)
    return summary


def save_later(writer: BackgroundWriter, path: Path, meta: dict, net: StagedNet, optimizer=None, first=None) -> None:
    """Snapshot the weights (and optimizer state) now; the writer runs `first`, if given, then saves them while
    training goes on."""
    model_state = cpu_snapshot(net.state_dict())
    optimizer_state = cpu_snapshot(optimizer.state_dict()) if optimizer is not None else None

    def job() -> None:
        if first is not None:
            first()
        save_checkpoint(path, meta, model_state, optimizer_state)

    writer.submit(job)


def train_stage(
    cfg, run, net, stage, s, first_epoch, optimizer_state, bundle, device, autocast, use_cache, writer, on_epoch_end
) -> None:
    """Stage s from `first_epoch` on (with the optimizer state of a resumed epoch), on the prefix cache when asked."""
    place_for(net, stage, device)
    loader = bundle.train
    if use_cache and stage.first > 0:
        t0 = time.perf_counter()
        seeds = [epoch_seed(cfg.train.seed, s, v) for v in range(cache_views(cfg))]
        loader = PrefixCache(net, stage.first, bundle.train, seeds, cfg.train.cache, run.path / "cache", autocast)
        seconds = time.perf_counter() - t0
        log.info("%s: cached %d view(s) of the frozen prefix in %.1f s", stage.name, len(seeds), seconds)
    compile_errors = (torch._dynamo.exc.TorchDynamoException,) if cfg.train.compile != "none" else ()
    memos = {"val": {}, "train_eval": {}}  # the frozen heads' scores, kept through the stage's evaluations
    try:
        optimizer = make_optimizer(trainable_modules(net, stage).parameters(), cfg.train)
        loss_fn = compiled_loss(cfg.train.compile)
        if optimizer_state is not None:
            load_optimizer_state(optimizer, optimizer_state)
        for epoch in range(first_epoch, cfg.train.epochs_per_block):
            try:
                train_one_epoch(
                    cfg, run, net, stage, s, epoch, loader, optimizer, loss_fn, bundle, autocast, memos, writer,
                    on_epoch_end,
                )  # fmt: skip
            except compile_errors as e:
                raise LayerwiseError(
                    f"train.compile={cfg.train.compile} failed in {stage.name} ({str(e).strip().splitlines()[0]}); "
                    f"checkpoints are kept in {run.checkpoints}: resume with --set train.compile=none"
                ) from None
    finally:  # also on an interruption: free the cache and delete its file
        if loader is not bundle.train:
            loader.close()


def train_one_epoch(
    cfg, run, net, stage, s, epoch, loader, optimizer, loss_fn, bundle, autocast, memos, writer, on_epoch_end
) -> None:
    """Train, stop on a non-finite loss, evaluate, then hand the metrics line and the epoch checkpoint to the
    writer (in that order, so no checkpoint is ahead of its metrics); on_epoch_end runs while they are written."""
    seed = epoch_seed(cfg.train.seed, s, epoch)
    torch.manual_seed(seed)
    lr = start_epoch(optimizer, cfg.train, epoch)
    desc = f"{stage.name} epoch {epoch + 1}/{cfg.train.epochs_per_block}"
    stats = train_epoch(net, stage, loader, optimizer, seed, autocast, desc, epoch, loss_fn)
    if not math.isfinite(stats["loss"]):
        raise LayerwiseError(
            f"training loss became {stats['loss']} in {stage.name}, epoch {epoch + 1} (lr {lr:g}); "
            f"checkpoints up to the previous epoch are kept in {run.checkpoints}; start again with a lower --lr"
        )
    row = epoch_row(net, stage, s, epoch, lr, stats, bundle, cfg, autocast, memos)
    meta = {"stage": s, "stage_name": stage.name, "block": stage.block, "epoch": epoch + 1, "lr": lr}
    line = copy.deepcopy(row)  # on_epoch_end gets row while the worker writes this copy
    save_later(writer, run.last, meta, net, optimizer, first=lambda: run.append_metrics(line))  # metrics first
    log.info(format_row(row))
    if on_epoch_end is not None:
        on_epoch_end(row)


def checked_model(
    cfg: RunConfig, num_classes: int, device: torch.device, state: dict | None = None, stage: Stage | None = None
) -> StagedNet:
    """Build the network (channels_last on a GPU and in bf16), load `state` if given, and run one blank RGB image
    through every block and head on the CPU, all before anything is written: problems become one line.

    Then the whole network goes to the device, or with a `stage` only what that stage runs (place_for).
    """
    size = cfg.data.image_size
    try:
        net = build_model(cfg.model, num_classes)
        set_recompute(net, cfg.train.recompute_activations)
        if state is not None:
            net.load_state_dict(state)
        if channels_last(device, cfg.train.precision):
            net = net.to(memory_format=torch.channels_last)
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, size, size))
    except (RuntimeError, ValueError) as e:
        raise LayerwiseError(
            f"the model cannot be built or run on 3x{size}x{size} inputs ({str(e).splitlines()[0][:200]}); "
            "check model.widths, model.downsample_at, model.in_channels and data.image_size"
        ) from None
    try:
        if stage is None:
            return net.to(device)
        place_for(net, stage, device)
    except torch.OutOfMemoryError:
        raise LayerwiseError(f"the network's weights do not fit in the memory of {device}") from None
    return net


def cache_views(cfg: RunConfig) -> int:
    """Views beyond the number of epochs would never be read."""
    return min(cfg.train.cache_views, cfg.train.epochs_per_block)


def plan_prefix_cache(cfg: RunConfig, net: StagedNet, images, device, folder: Path, autocast) -> None:
    """Size the largest prefix cache of the run and refuse it now if it cannot fit."""
    for stale in folder.glob("prefix*.bin"):  # left by an interrupted run; it would count as used space
        stale.unlink()
    if not isinstance(images, MemoryLoader):
        raise LayerwiseError("train.cache needs in-memory data (data.augment=cifar); set train.cache=none")
    dtype = cache_dtype(autocast)
    shapes = prefix_shapes(net, images.normalize(images.images[:1]))
    n, views = images.num_examples, cache_views(cfg)
    greedy = plan_stages(cfg.model.J, "greedy")

    def weights(i: int) -> int:  # a GPU cache must leave room for the weights stage i brings to the device
        on_gpu = cfg.train.cache == "device" and device.type == "cuda"
        return module_bytes(resident_modules(net, greedy[i]), off=device) if on_gpu else 0

    j = max(range(1, cfg.model.J), key=lambda i: cache_bytes(n, views, shapes[i], dtype) + weights(i))
    needed = cache_bytes(n, views, shapes[j], dtype)
    what = f"block {j}'s input ({views} view(s) of {n} images at {'x'.join(map(str, shapes[j]))}, {dtype})"
    if weights(j):
        what += f" and the {human(weights(j))} of weights that stage brings to the device"
    check_cache_fits(needed + weights(j), cfg.train.cache, device, folder, what)
    log.info("prefix cache: at most %.2f GiB (%s)", needed / 2**30, what)


def epoch_row(net, stage, s, epoch, lr, stats, bundle, cfg, autocast, memos) -> dict[str, Any]:
    """One metrics line: the trained head's numbers and the ensemble over heads 0..block (the frozen heads'
    scores come from `memos` after the stage's first evaluation)."""
    blocks = list(stage.eval_blocks)
    val = evaluate(net, bundle.val, blocks, cfg.train.ensemble, autocast, memos["val"])
    row = {
        "stage": s,
        "stage_name": stage.name,
        "block": stage.block,
        "epoch": epoch + 1,
        "lr": lr,
        "loss": stats["loss"],
        "train": {"top1": stats["top1"], "top5": stats["top5"]},
        "val": {**val["blocks"][stage.block], "loss": val["loss"]},
        "images_per_s": stats["images_per_s"],
        "seconds": stats["seconds"],
    }
    if bundle.train_eval is not None:
        clean = evaluate(net, bundle.train_eval, blocks, cfg.train.ensemble, autocast, memos["train_eval"])
        row["train_eval"] = {**clean["blocks"][stage.block], "loss": clean["loss"]}
    return row


def format_row(row: dict[str, Any]) -> str:
    v = row["val"]
    return (
        f"{row['stage_name']} epoch {row['epoch']}: loss {row['loss']:.3f} train top-1 {row['train']['top1']:.1f} "
        f"val top-1 {v['top1']:.2f} top-5 {v['top5']:.2f} ensemble {v['ensemble_top1']:.2f} "
        f"({row['images_per_s']:.0f} img/s, {row['seconds']:.1f} s)"
    )


def summarize(cfg: RunConfig, net: StagedNet, rows: list[dict], stages, seconds: float, device) -> dict[str, Any]:
    """Per-block results (each stage's last epoch), the final network's numbers and the paper's targets."""
    per_stage = []
    for s, stage in enumerate(stages):
        mine = [r for r in rows if r["stage"] == s]
        if not mine:
            raise LayerwiseError(
                f"metrics.jsonl has no line for {stage.name}, which the checkpoints cover; the summary cannot be "
                "written (the trained weights are in checkpoints/)"
            )
        last = mine[-1]
        entry = {
            "stage": stage.name,
            "block": stage.block,
            "downsample": stage.block in cfg.model.downsample_at,
            **{f"val_{k}": v for k, v in last["val"].items()},
            "train_top1": last["train"]["top1"],
            "train_loss": last["loss"],
            "seconds": sum(r["seconds"] for r in mine),
        }
        if "train_eval" in last:
            entry.update({f"train_eval_{k}": v for k, v in last["train_eval"].items()})
        per_stage.append(entry)
    # Proposition 3.1: with P_j = Id the best risk cannot grow from one block to the next. Compared on the
    # clean training subset (eval mode, final weights) when there is one, else on the epoch's running loss.
    risk = "train_eval_loss" if all("train_eval_loss" in e for e in per_stage) else "train_loss"
    for prev, cur in itertools.pairwise(per_stage):
        if not cur["downsample"]:
            cur["improves_on_previous"] = cur[risk] <= prev[risk]
    final = per_stage[-1]
    return {
        "preset": cfg.preset,
        "mode": cfg.train.mode,
        "device": str(device),
        "blocks": per_stage,
        "final": {k: final[k] for k in ("val_top1", "val_top5", "val_ensemble_top1", "val_ensemble_top5")},
        "params_final": net.final_parameters(),
        "params_heads": net.head_parameters(),
        "train_seconds": sum(r["seconds"] for r in rows),
        "wall_seconds_this_session": seconds,
        "paper": cfg.paper,
    }


def summary_table(summary: dict[str, Any]) -> str:
    columns = ("val top-1", "top-5", "ens top-1", "ens top-5", "train top-1", "time s")
    header = f"{'stage':<10} " + " ".join(f"{c:>{max(len(c), 7)}}" for c in columns)
    lines = [header, "-" * len(header)]
    for b in summary["blocks"]:
        lines.append(
            f"{b['stage']:<10} {b['val_top1']:>9.2f} {b['val_top5']:>7.2f} {b['val_ensemble_top1']:>9.2f} "
            f"{b['val_ensemble_top5']:>9.2f} {b['train_top1']:>11.2f} {b['seconds']:>7.1f}"
        )
    if summary.get("paper"):
        lines.append("paper: " + ", ".join(f"{k} {v:g}" for k, v in summary["paper"].items()))
    return "\n".join(lines)


def run_info(cfg: RunConfig, device: torch.device, data, description: str) -> dict[str, Any]:
    return {
        "layerwise": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "data": str(data) if data is not None else "built-in sample",
        "data_path": str(Path(data).resolve()) if data is not None else None,
        "data_description": description,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def evaluate_run(run_dir, data, device: str = "auto", batch_size: int = 256, precision: str | None = None) -> dict:
    """Score a run's trained heads on data no one trained on, mapping its classes by name.

    Uses checkpoints/final.pt when the run finished, else the last epoch's checkpoint.
    """
    run = RunDir(run_dir)
    cfg = config_from_dict(run.saved_config())
    classes = run.read_classes()
    path = run.final if run.final.is_file() else run.last
    if not path.is_file():
        raise LayerwiseError(f"{run.path} has no checkpoint yet; train at least one epoch first")
    meta, state, _ = load_checkpoint(path)
    dev = resolve_device(device)
    net = checked_model(cfg, len(classes), dev, state)
    last_block = cfg.model.J - 1 if path == run.final else meta["block"]
    blocks = [cfg.model.J - 1] if cfg.train.mode == "e2e" else list(range(last_block + 1))
    loader = build_eval_loader(cfg.data, data, classes, batch_size, dev)
    result = evaluate(net, loader, blocks, cfg.train.ensemble, fast_path(dev, precision or cfg.train.precision))
    return {**result, "checkpoint": str(path), "data": str(data)}

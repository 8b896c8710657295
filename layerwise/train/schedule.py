"""The learning rate over a stage: the paper's step schedule, or a per-step cosine or triangle with warm-up."""

from __future__ import annotations

import math

from layerwise.config import TrainConfig
from layerwise.stages import Stage


def stage_epochs(cfg: TrainConfig, stage: Stage) -> int:
    """The stage's epochs: a greedy block's own (train.block_epochs), or their sum for a stage of every block."""
    return cfg.epochs(stage.block if stage.finishes_block else None)


def lr_at_step(cfg: TrainConfig, epoch: int, step: int, steps: int, epochs: int | None = None) -> float:
    """A per-step schedule (train.schedule cosine or triangle) at step `step` of `steps` in epoch `epoch` of a
    stage of `epochs` (default epochs_per_block): t = epoch x steps + step of T = epochs x steps, after
    W = round(warmup_epochs x steps) linear warm-up steps warmup_from + (lr - warmup_from) x (t + 1) / W; then cosine
    lr x (1 + cos(pi (t - W) / (T - W))) / 2, or triangle lr x (T - t) / (T - W)."""
    total = (epochs or cfg.epochs_per_block) * steps
    warmup = min(round(cfg.warmup_epochs * steps), total - 1)  # the warm-up ends before the stage does
    t = epoch * steps + min(step, steps - 1)  # a pipeline process with replays may step past its epoch's count
    if t < warmup:
        return cfg.warmup_from + (cfg.lr - cfg.warmup_from) * (t + 1) / warmup
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
    return cfg.lr * (total - t) / (total - warmup)


def decays_by(cfg: TrainConfig, epoch: int, epochs: int | None = None) -> int:
    """The step schedule's decays up to and including epoch `epoch` of a stage of `epochs` (default
    epochs_per_block): lr_step counts epochs of epochs_per_block, and a stage of another length (train.block_epochs)
    has its decays at the same fractions of it, decay k at epoch round(k x lr_step x epochs / epochs_per_block)
    (halves rounded up). A stage of epochs_per_block epochs decays every lr_step epochs, as the paper's."""
    stretch = (epochs or cfg.epochs_per_block) / cfg.epochs_per_block
    return sum(1 for k in range(1, epoch + 1) if math.floor(k * cfg.lr_step * stretch + 0.5) <= epoch)


def lr_at(cfg: TrainConfig, epoch: int, epochs: int | None = None) -> float:
    """Step schedule within a stage: lr x gamma^(decays so far) (see decays_by); lr x gamma^(epoch // lr_step) for
    a stage of epochs_per_block epochs."""
    return cfg.lr * cfg.lr_gamma ** decays_by(cfg, epoch, epochs)

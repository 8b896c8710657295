"""The loop every strategy shares: a stage set up to train (StageTraining), its step, and one epoch."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from layerwise.config import TrainConfig
from layerwise.data.loaders import Loader
from layerwise.device import Precision
from layerwise.distributed import SINGLE, Dist
from layerwise.evaluate import topk_correct
from layerwise.models.staged import StagedNet
from layerwise.stages import Stage, place_for
from layerwise.train.divergence import LossWatch
from layerwise.train.ema import WeightAverage
from layerwise.train.losses import local_loss
from layerwise.train.optim import Optimizers
from layerwise.train.schedule import decays_by, lr_at, lr_at_step, stage_epochs
from layerwise.train.stage import BlockRandomness, freeze_for, frozen_prefix, network_key


@dataclass(frozen=True)
class Wiring:
    """How a stage's process is tied to others beyond data parallelism: in a pipeline (train/pipeline.py)."""

    downstream: Any = None
    """The link to the next pipeline process (train/pipeline.Pipe): each step sends its last block's output and
    the labels there, before its backward pass."""
    reported: tuple[int, ...] | None = None
    """The heads an epoch's figures cover: every pipeline process's (each process fills its own heads' figures,
    and the all-reduce the rest). None: the stage's loss heads."""
    replica_group: Any = None
    """In a pipeline with several replicas, the processes holding this one's blocks (DDP among them)."""


ALONE = Wiring()


class StageTraining:
    """A stage set up to train: its modules on the device and frozen as Algorithm 1 says, the StageModule it
    trains (in DDP under torchrun, compiled when train.compile asks) and the module's optimizer.

    `train` and `layerwise bench` both train through this object. Under DDP only the StageModule is wrapped:
    the frozen blocks run outside it, without gradients, and their weights are never all-reduced.
    """

    def __init__(
        self,
        net: StagedNet,
        stage: Stage,
        cfg: TrainConfig,
        precision: Precision,
        where: Dist = SINGLE,
        optimizer_state: dict | None = None,
        loss_level: float | None = None,
        wiring: Wiring = ALONE,
    ):
        self.net, self.stage, self.cfg, self.precision, self.where = net, stage, cfg, precision, where
        self.epochs = stage_epochs(cfg, stage)
        self.downstream, self.replica_group = wiring.downstream, wiring.replica_group  # see Wiring
        self.reported = wiring.reported or stage.loss_heads
        """The heads an epoch's figures cover (Wiring.reported)."""
        self.loss_level = loss_level
        """The stage's starting loss level, which the divergence check compares with (LossWatch); None until the
        stage's first window is measured, and kept in the epoch checkpoints for resume."""
        device = precision.device
        place_for(net, stage, device)
        self.module = freeze_for(net, stage, local_loss(cfg), cfg.block_chunks, self.downstream is not None)
        if cfg.sync_bn and where.data_parallel:  # replaces the BN modules inside the network's own blocks and head
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        if stage.decoupled:
            parts = zip(stage.trained_blocks, self.module.blocks, self.module.heads, strict=True)
            own = {j: [*block.parameters(), *head.parameters()] for j, block, head in parts}
            self.optimizer = Optimizers(own, cfg)
        else:
            self.optimizer = Optimizers(list(self.module.parameters()), cfg)
        self.average = WeightAverage(self.module, cfg.ema, partial(network_key, stage)) if cfg.ema else None
        self.optimizer.average = self.average
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        model: nn.Module = self.module
        if where.data_parallel:  # starts from rank 0's weights and buffers; all-reduces gradients in the backward pass
            model = DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, process_group=self.replica_group
            )
        if cfg.compile != "none":
            # Each stage freezes other modules and recompiles anyway; stale entries would count towards
            # torch's recompilation limit.
            torch.compiler.reset()
            model = torch.compile(model, mode=cfg.compile)
        self.model = model

    def start_epoch(self, epoch: int, seed: int = 0, steps: int = 1) -> float:
        """Set this epoch's learning rate (its first step's, under a per-step schedule of `steps` per epoch); at a
        decay of the step schedule, optionally forget momentum as the released code does. Put the frozen modules
        back in eval mode (evaluation switches modes). A decoupled stage's blocks draw from random streams of their
        own, seeded from `seed` (BlockRandomness)."""
        if self.cfg.schedule == "step":
            lr = lr_at(self.cfg, epoch, self.epochs)
            decays = [decays_by(self.cfg, e, self.epochs) for e in (epoch - 1, epoch)]
            decay = self.cfg.reset_momentum_at_decay and epoch > 0 and decays[1] > decays[0]
            self.optimizer.set_lr(lr, forget_momentum=decay)
        else:
            lr = lr_at_step(self.cfg, epoch, 0, steps, self.epochs)
            self.optimizer.set_lr(lr)
        if self.stage.decoupled:
            self.module.randomness = BlockRandomness(seed, self.precision.device)
        self.net.eval()
        self.module.train()
        return lr

    def step(
        self, x: torch.Tensor, y: torch.Tensor, offset: int = 0, weight: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimisation step. x is the input of block `offset`: the image when 0, else a cached output of the
        frozen prefix. Returns (loss, logits), both still on the device (StageModule: one loss head's, or a
        decoupled stage's (H,) losses and (H, B, classes) logits); each loss is the mean over this process's
        images. The losses of several heads are summed for the backward pass: their graphs are disjoint, so each
        block gets its own head's gradient. `weight` scales the gradient so that DDP's average over processes is the
        global batch's mean when the processes' shares differ in size (the last batch of an epoch)."""
        # Free the last step's gradients before the forward pass, so they never coexist with its activations.
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            loss, logits = self.model(frozen_prefix(self.net, self.stage, x, offset), y)
        if self.downstream is not None:  # the next process starts on this batch while this one updates
            self.downstream.send(self.module.output, y)
            self.module.output = None  # the pipe holds it until sent
        total = loss.sum() if loss.dim() else loss
        (total if weight == 1.0 else total * weight).backward()
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        return loss, logits

    def sync(self) -> None:
        """Every process takes rank 0's BN statistics (and averaged ones), before evaluation and checkpoints (see
        Dist)."""
        self.where.broadcast_buffers(self.module, self.replica_group)
        if self.average is not None:
            self.where.broadcast_tensors(self.average.average, self.replica_group)

    @contextmanager
    def evaluated(self, finished: bool) -> Iterator[None]:
        """The weights an epoch's evaluation scores: the stage's own, or with train.ema their average, which a
        `finished` stage keeps for good (the next greedy block trains on it, block{j}.pt and final.pt hold it)."""
        if self.average is None:
            yield
        elif finished:
            self.average.copy_to_module()
            yield
        else:
            with self.average.in_module():
                yield


def train_epoch(training: StageTraining, loader: Loader, seed: int, epoch: int = 0, desc: str = "") -> dict:
    """One pass over the training data. Sums stay on the device; the only host sync is at the end.

    `loader` yields this process's share of each batch: images, or (a PrefixCache) the frozen blocks' output for
    this epoch's cached view. Under DDP the returned figures are over every process's images. The loss and
    top-1/top-5 are the stage's last loss head's; a stage with several (decoupled) adds each one's under "heads".
    The divergence check watches the sum of the heads' losses.
    """
    where = training.where
    offset = loader.offset
    heads, reported = training.stage.loss_heads, training.reported
    rows = [reported.index(j) for j in heads]  # where this process's heads go among the reported ones
    # per reported head: loss * n, top-1 hits, top-5 hits, images; replayed steps, fresh batches dropped unused
    sums = torch.zeros(len(reported), 6, dtype=torch.float64, device=loader.device)
    n = 0
    t0 = time.perf_counter()
    batches = tqdm(
        loader.batches(seed, epoch), total=len(loader), desc=desc, leave=False, disable=None if where.is_main else True
    )
    # a pipeline with replays trains a different number of steps in each process: each checks its own losses
    replaying = training.cfg.replay > 0
    watch = LossWatch(
        training.cfg.divergence_factor, loader.device, SINGLE if replaying else where, training.loss_level
    )
    per_step = training.cfg.schedule != "step"
    for i, (x, y) in enumerate(batches):
        if per_step:
            training.optimizer.set_lr(lr_at_step(training.cfg, epoch, i, len(loader), training.epochs))
        weight = len(y) * where.replicas / loader.global_batch(i) if where.data_parallel else 1.0
        loss, logits = training.step(x, y, offset, weight)
        with torch.no_grad():
            losses, scores = loss.detach().double().view(-1), logits.detach().float().view(len(heads), len(y), -1)
            labels = y if y.dim() == 1 else y.argmax(1)  # data.mix: the larger share's label
            for h, z in enumerate(scores):
                sums[rows[h], :3] += torch.stack([losses[h] * len(y), *topk_correct(z, labels)])
            watch.add(losses.sum(), logits.shape[-1])
        n += len(y)
        if watch.due(i, len(loader)):
            watch.check()
    if replaying:
        watch.check()  # the steps since the last check (a process with replays ends past len(loader))
    training.loss_level = watch.level
    if training.downstream is not None:
        training.downstream.send_end()
        training.downstream.flush()
    sums[rows, 3] = float(n)  # every head of this process saw each of its images (no tensor per step for it)
    sums[rows, 4] = float(getattr(loader, "replays", 0))  # a pipeline process's replay counts (Received)
    sums[rows, 5] = float(getattr(loader, "dropped", 0))
    n = n if where.position == 0 else 0  # a pipeline's processes all see the same images: count them once
    *flat, n = where.sum(torch.cat([sums.flatten(), sums.new_tensor([n])])).tolist()
    seconds = time.perf_counter() - t0
    figures = {}
    for j, (loss_sum, top1, top5, images, replays, dropped) in zip(
        reported, (flat[i : i + 6] for i in range(0, len(flat), 6)), strict=True
    ):
        figures[j] = {"loss": loss_sum / images, "top1": 100.0 * top1 / images, "top5": 100.0 * top5 / images}
        if replaying:
            figures[j].update(replays=int(replays), dropped=int(dropped))
    out = {**figures[reported[-1]], "images_per_s": n / seconds, "seconds": seconds}
    if len(reported) > 1:
        out["heads"] = figures
    return out

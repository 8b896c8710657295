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

from layerwise.config import RunConfig
from layerwise.data.loaders import Loader
from layerwise.device import Precision
from layerwise.distributed import ALONE, Replicas
from layerwise.errors import LayerwiseError
from layerwise.evaluate import topk_correct
from layerwise.losses import local_losses
from layerwise.models.staged import StagedNet
from layerwise.stages import Stage, place_for
from layerwise.train.divergence import LossWatch, Summed
from layerwise.train.ema import WeightAverage
from layerwise.train.optim import Optimizers
from layerwise.train.schedule import decays_by, lr_at, lr_at_step, stage_epochs
from layerwise.train.stage import freeze_for, frozen_prefix, network_key


class StageTraining:
    """A stage set up to train: its modules on the device and frozen as Algorithm 1 says, the StageModule it
    trains (in DDP under torchrun, compiled when train.compile asks) and the module's optimizer.

    `cfg` is the run's config: its train settings (kept as `cfg`) and what the heads' local losses need (model.head,
    data.mean and data.std: layerwise.losses.local_losses).
    `train` and `layerwise bench` both train through this object. Under DDP only the StageModule is wrapped:
    the frozen blocks run outside it, without gradients, and their weights are never all-reduced.
    """

    keeps_output = False
    """Whether the StageModule keeps its last block's output after each forward pass (a subclass's `forwarded`
    reads it)."""

    def __init__(self, net: StagedNet, stage: Stage, run: RunConfig, precision: Precision, replicas=ALONE):
        cfg = run.train
        self.net, self.stage, self.cfg, self.precision = net, stage, cfg, precision
        self.replicas: Replicas = replicas
        """The processes that split each batch (DDP among them)."""
        self.epochs = stage_epochs(cfg, stage)
        self.loss_level: float | None = None
        """The stage's starting loss level, which the divergence check compares with (LossWatch); None until the
        stage's first window is measured, and kept in the epoch checkpoints for resume."""
        device = precision.device
        place_for(net, stage, device)
        self.module = freeze_for(net, stage, local_losses(run, net.J), cfg.block_chunks, self.keeps_output)
        if cfg.sync_bn and replicas.active:  # replaces the BN modules inside the network's own blocks and head
            self.module = nn.SyncBatchNorm.convert_sync_batchnorm(self.module)
        if stage.decoupled:
            parts = zip(stage.trained_blocks, self.module.blocks, self.module.heads, strict=True)
            own = {j: [*block.parameters(), *head.parameters()] for j, block, head in parts}
            self.optimizer = Optimizers(own, cfg)
        else:
            self.optimizer = Optimizers(list(self.module.parameters()), cfg)
        self.average = WeightAverage(self.module, cfg.ema, partial(network_key, stage)) if cfg.ema else None
        model: nn.Module = self.module
        if replicas.active:  # starts from replica 0's weights and buffers; all-reduces gradients in the backward pass
            model = DistributedDataParallel(
                model, device_ids=[device] if device.type == "cuda" else None, process_group=replicas.group
            )
        if cfg.compile != "none":
            # Each stage freezes other modules and recompiles anyway; stale entries would count towards
            # torch's recompilation limit.
            torch.compiler.reset()
            model = torch.compile(model, mode=cfg.compile)
        self.model = model

    def load_state(self, state: dict[str, Any] | None, loss_level: float | None = None) -> None:
        """Continue a stage from an epoch checkpoint's `state()` (its optimizer and train.ema's average; None: the
        stage's start) and its divergence check from `loss_level`."""
        self.loss_level = loss_level
        if state is None:
            return
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.average is not None:
            if state.get("average") is None:
                raise LayerwiseError("the checkpoint has no weight average (train.ema); start anew")
            self.average.load_state_dict(state["average"])

    def state(self) -> dict[str, Any]:
        """What an epoch checkpoint keeps besides the network: the optimizer's state and train.ema's average."""
        state = {"optimizer": self.optimizer.state_dict()}
        if self.average is not None:
            state["average"] = self.average.state_dict()
        return state

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
            self.module.start_epoch(seed, self.precision.device)
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
        self.forwarded(y)
        total = loss.sum() if loss.dim() else loss
        (total if weight == 1.0 else total * weight).backward()
        self.optimizer.step()
        if self.average is not None:
            self.average.update()
        return loss, logits

    def forwarded(self, y: torch.Tensor) -> None:
        """Runs after each step's forward pass, before its backward pass: a hook for subclasses."""

    def sync(self) -> None:
        """Every replica takes replica 0's BN statistics (and averaged ones), before evaluation and checkpoints."""
        self.replicas.broadcast(list(self.module.buffers()))
        if self.average is not None:
            self.replicas.broadcast(self.average.average)

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


class Tally:
    """An epoch's sums per reported head, on the device: one row per head, one named column per figure."""

    STEP_COLUMNS = ("loss", "top1", "top5")
    """What each step adds: loss x images, top-1 hits, top-5 hits."""
    COLUMNS = (*STEP_COLUMNS, "images")

    def __init__(self, reported: tuple[int, ...], heads: tuple[int, ...], device: torch.device, extra=(), scored=None):
        """`reported`: the heads the figures cover; `heads`: this process's among them; `extra`: more columns,
        each set once per epoch (`set`); `scored`: the heads among them that classify (None: all), whose logits
        `add` gets."""
        self.reported, self.columns = reported, (*self.COLUMNS, *extra)
        self.rows = [reported.index(j) for j in heads]  # where this process's heads go among the reported ones
        self.scored = set(reported if scored is None else scored)
        self.scored_rows = [r for r, j in zip(self.rows, heads, strict=True) if j in self.scored]
        self.sums = torch.zeros(len(reported), len(self.columns), dtype=torch.float64, device=device)  # (heads, cols)
        self.loss_at, self.hits_at = self.columns.index("loss"), self.columns.index("top1")  # top-1, then top-5
        self.n = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """One step's losses (H,) or () of this process's heads, and logits (S, B, classes) or (B, classes) of
        those among them that classify."""
        losses = loss.detach().double().view(-1)  # (H,)
        scores = logits.detach().float().view(len(self.scored_rows), len(y), -1)  # (S, B, classes)
        labels = y if y.dim() == 1 else y.argmax(1)  # (B,); data.mix: the larger share's label
        self.sums[self.rows, self.loss_at] += losses * len(y)
        for row, z in zip(self.scored_rows, scores, strict=True):
            self.sums[row, self.hits_at : self.hits_at + 2] += torch.stack(topk_correct(z, labels)).double()
        self.n += len(y)

    def set(self, column: str, value: float) -> None:
        """The same `value` in `column` of every head of this process."""
        self.sums[self.rows, self.columns.index(column)] = value

    def figures(self, reduce, images: int, t0: float) -> dict:
        """The epoch's figures after `reduce` added every process's sums (and `images`, the images it counts):
        the last reported head's loss, top-1 and top-5, and with several heads each one's under "heads"; `t0`:
        the epoch's start (time.perf_counter)."""
        self.set("images", float(self.n))  # every head of this process saw each of its images
        *flat, images = reduce(torch.cat([self.sums.flatten(), self.sums.new_tensor([images])])).tolist()
        seconds = time.perf_counter() - t0
        width = len(self.columns)
        figures = {}
        for j, i in zip(self.reported, range(0, len(flat), width), strict=True):
            row = dict(zip(self.columns, flat[i : i + width], strict=True))
            scored = j in self.scored  # a head that does not classify has a loss and no accuracy
            figures[j] = {"loss": row["loss"] / row["images"],
                          "top1": 100.0 * row["top1"] / row["images"] if scored else None,
                          "top5": 100.0 * row["top5"] / row["images"] if scored else None}  # fmt: skip
            figures[j].update({k: int(row[k]) for k in self.columns[len(self.COLUMNS) :]})
        out = {**figures[self.reported[-1]], "images_per_s": images / seconds, "seconds": seconds}
        if len(self.reported) > 1:
            out["heads"] = figures
        return out


@dataclass(frozen=True)
class Counting:
    """How an epoch's steps are counted: into `tally`; the divergence check adds its window up `over` those
    processes (ALONE: this process judges its own losses); a progress bar when `shown`."""

    tally: Tally
    over: Summed = ALONE
    shown: bool = True


def train_steps(training: StageTraining, loader: Loader, seed: int, epoch: int, desc: str, counting: Counting):
    """Train on every batch `loader` yields for the epoch, counting each step and checking the losses for
    divergence (LossWatch: the sum of the heads' losses)."""
    offset, steps, tally = loader.offset, len(loader), counting.tally
    shown = None if counting.shown else True  # None: tqdm shows the bar on a terminal only
    batches = tqdm(loader.batches(seed, epoch), total=steps, desc=desc, leave=False, disable=shown)
    watch = LossWatch(training.cfg.divergence_factor, loader.device, counting.over, training.loss_level)
    per_step = training.cfg.schedule != "step"
    parallel = training.replicas
    for i, (x, y) in enumerate(batches):
        if per_step:
            training.optimizer.set_lr(lr_at_step(training.cfg, epoch, i, steps, training.epochs))
        weight = len(y) * parallel.count / loader.global_batch(i) if parallel.active else 1.0
        loss, logits = training.step(x, y, offset, weight)  # (H,) or (); (H, B, classes) or (B, classes)
        with torch.no_grad():
            tally.add(loss, logits, y)
            watch.add(loss.detach().double().view(-1).sum(), logits.shape[-1])
        if watch.due(i, steps):
            watch.check()
    watch.check_rest()  # a loader that yields more than len(loader) batches (a pipeline's replays)
    training.loss_level = watch.level


def train_epoch(training: StageTraining, loader: Loader, seed: int, epoch: int = 0, desc: str = "") -> dict:
    """One pass over the training data. Sums stay on the device; the only host sync is at the end.

    `loader` yields this process's share of each batch: images, or (a PrefixCache) the frozen blocks' output for
    this epoch's cached view. Under DDP the returned figures are over every process's images. The loss and
    top-1/top-5 are the stage's last loss head's; a stage with several (decoupled) adds each one's under "heads".
    """
    heads, replicas = training.stage.loss_heads, training.replicas
    tally = Tally(heads, heads, loader.device, scored=training.net.classifying)
    t0 = time.perf_counter()
    train_steps(training, loader, seed, epoch, desc, Counting(tally, replicas, shown=replicas.index == 0))
    return tally.figures(replicas.sum, tally.n, t0)

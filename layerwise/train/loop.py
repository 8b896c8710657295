"""The loop every strategy shares: a stage set up to train (StageTraining), its step, and one epoch."""

from __future__ import annotations

import math
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
from layerwise.errors import LayerwiseError
from layerwise.evaluate import topk_correct
from layerwise.models.staged import StagedNet
from layerwise.stages import Stage, place_for
from layerwise.train.losses import local_loss
from layerwise.train.stage import BlockRandomness, freeze_for, frozen_prefix, network_key


def make_optimizer(params, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.SGD:
    """SGD with momentum (Nesterov's with train.nesterov) and weight decay. `fused` (default: on a GPU, when this
    torch has it) does the whole update in one kernel. The CPU keeps the for-loop update by default: fused rounds
    differently, which moved the demo's last block from 65.1 to 64.2 % (2026-11-26), and the documented CPU
    results must stay reproducible."""
    params = list(params)
    options = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "nesterov": cfg.nesterov}
    if fused is None:
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
    if fused:
        try:
            return torch.optim.SGD(params, fused=True, **options)
        except (TypeError, RuntimeError):  # an older torch without fused SGD
            pass
    return torch.optim.SGD(params, **options)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state but keep this optimizer's implementation (fused, foreach): the saved groups
    carry the flags of the device the run was on, and a run may resume on another one."""
    chosen = [{key: group.get(key) for key in ("fused", "foreach")} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, chosen, strict=True):
        group.update(flags)


class WeightAverage:
    """train.ema: an exponential moving average of a module's state (its weights and BN statistics; integer
    buffers, the BN batch counts, are copied). Update t (from 0) moves the average towards the module's state by
    1 - d_t, with d_t = min(decay, (1 + t) / (10 + t)): TensorFlow's ExponentialMovingAverage with num_updates,
    so that the average leaves the initial weights behind within the first steps."""

    def __init__(self, module: nn.Module, decay: float, rename=None):
        self.decay, self.updates = decay, 0
        state = module.state_dict()  # tensors sharing the module's storage: they see every update in place
        self.names = [rename(k) if rename else k for k in state]  # as saved: the network's names (StageTraining)
        self.live = list(state.values())
        self.average = [t.detach().clone() for t in self.live]

    def rate(self) -> float:
        """d_t of the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1 - self.rate()
        for average, live in zip(self.average, self.live, strict=True):
            if average.is_floating_point():
                average.lerp_(live, weight)
            else:
                average.copy_(live)
        self.updates += 1

    @torch.no_grad()
    def copy_to_module(self) -> None:
        """Put the average in the module's place for good (the end of a stage)."""
        for live, average in zip(self.live, self.average, strict=True):
            live.copy_(average)

    @contextmanager
    def in_module(self) -> Iterator[None]:
        """The average in the module's place for the duration, its own state back afterwards."""
        kept = [t.clone() for t in self.live]
        self.copy_to_module()
        try:
            yield
        finally:
            with torch.no_grad():
                for live, saved in zip(self.live, kept, strict=True):
                    live.copy_(saved)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "tensors": dict(zip(self.names, self.average, strict=True))}

    def load_state_dict(self, state: dict) -> None:
        tensors = state.get("tensors") if isinstance(state, dict) else None
        if not isinstance(tensors, dict) or list(tensors) != self.names or not isinstance(state.get("updates"), int):
            raise LayerwiseError("the checkpoint's weight average (train.ema) does not match this stage; start anew")
        with torch.no_grad():
            for average, saved in zip(self.average, tensors.values(), strict=True):
                if not isinstance(saved, torch.Tensor) or saved.shape != average.shape:
                    raise LayerwiseError("the checkpoint's weight average (train.ema) does not match this stage")
                average.copy_(saved)
        self.updates = state["updates"]


class Optimizers:
    """The stage's optimizers: one SGD over everything it trains, or (decoupled) one per trained block, over the
    block and its head, as DGL's code has, so that a process holding some of the blocks holds their optimizers.
    Every block follows the same step schedule (lr_at). The state_dict of one is the SGD's own (checkpoints of
    greedy and end-to-end runs are unchanged); of several, {"blocks": {"j": SGD state}}."""

    def __init__(self, groups: dict[int, list[nn.Parameter]] | list[nn.Parameter], cfg: TrainConfig):
        self.per_block = isinstance(groups, dict)
        parts = groups if self.per_block else {-1: groups}
        self.optimizers = {j: make_optimizer(params, cfg) for j, params in parts.items()}
        self.average: WeightAverage | None = None
        """train.ema's average of the stage, saved and loaded with the optimizers' state under "average"."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def set_lr(self, lr: float, forget_momentum: bool = False) -> None:
        for optimizer in self.optimizers.values():
            if forget_momentum:
                optimizer.state.clear()
            for group in optimizer.param_groups:
                group["lr"] = lr

    @property
    def state(self) -> dict:
        """Every optimizer's per-parameter state (the momentum buffers), together."""
        return {p: state for optimizer in self.optimizers.values() for p, state in optimizer.state.items()}

    @property
    def param_groups(self) -> list[dict]:
        return [g for optimizer in self.optimizers.values() for g in optimizer.param_groups]

    def state_dict(self) -> dict:
        if not self.per_block:
            state = self.optimizers[-1].state_dict()
        else:
            state = {"blocks": {str(j): optimizer.state_dict() for j, optimizer in self.optimizers.items()}}
        return state if self.average is None else {**state, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.average is not None:
            if not isinstance(state, dict) or "average" not in state:
                raise LayerwiseError("the checkpoint has no weight average (train.ema); start anew")
            self.average.load_state_dict(state["average"])
            state = {key: value for key, value in state.items() if key != "average"}
        if not self.per_block:
            load_optimizer_state(self.optimizers[-1], state)
            return
        saved = state.get("blocks") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or not {str(j) for j in self.optimizers} <= saved.keys():
            raise LayerwiseError("the checkpoint's optimizer state does not cover this stage's blocks; start anew")
        for j, optimizer in self.optimizers.items():
            load_optimizer_state(optimizer, saved[str(j)])


def stage_epochs(cfg: TrainConfig, stage: Stage) -> int:
    """The stage's epochs: a greedy block's own (train.block_epochs), or their sum for a stage of every block."""
    return cfg.epochs(stage.block if stage.finishes_block else None)


def lr_at_step(cfg: TrainConfig, epoch: int, step: int, steps: int, epochs: int | None = None) -> float:
    """A per-step schedule (train.schedule cosine or triangle) at step `step` of `steps` in epoch `epoch` of a
    stage of `epochs` (default epochs_per_block): t = epoch x steps + step of T = epochs x steps, after
    W = round(warmup_epochs x steps) linear warm-up steps lr x (t + 1) / W; then cosine
    lr x (1 + cos(pi (t - W) / (T - W))) / 2, or triangle lr x (T - t) / (T - W)."""
    total = (epochs or cfg.epochs_per_block) * steps
    warmup = min(round(cfg.warmup_epochs * steps), total - 1)  # the warm-up ends before the stage does
    t = epoch * steps + min(step, steps - 1)  # a pipeline process with replays may step past its epoch's count
    if t < warmup:
        return cfg.lr * (t + 1) / warmup
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


DIVERGENCE_WINDOW = 50
"""Steps in the running mean that train.divergence_factor checks, and how often the check is read."""


class Diverged(Exception):
    """The stage's training loss diverged at `step` of the epoch: non-finite, or a running mean of `mean`."""

    def __init__(self, step: int, mean: float, limit: float):
        super().__init__(f"running mean {mean:.4g} at step {step}, limit {limit:.4g}")
        self.step, self.mean, self.limit = step, mean, limit


class LossWatch:
    """The epoch's last DIVERGENCE_WINDOW step losses on the device, with a flag for a non-finite one: no host
    sync per step. `check` reads them (one sync, and under DDP one all-reduce, so every process stops together).

    The stage's starting level is the mean of its first window (or of its first epoch, when shorter), and never
    below ln(classes), the loss of a uniform guess: early spikes raise the level instead of stopping the run.
    After that, a window whose mean exceeds factor x the level, or any non-finite loss, raises Diverged.
    """

    def __init__(self, factor: float, device: torch.device, where: Dist = SINGLE, level: float | None = None):
        self.factor, self.where, self.level = factor, where, level
        self.window = torch.zeros(DIVERGENCE_WINDOW, dtype=torch.float64, device=device)
        self.bad = torch.zeros((), dtype=torch.float64, device=device)
        self.steps, self.classes = 0, 0

    def add(self, loss: torch.Tensor, classes: int) -> None:
        loss = loss.detach().double()
        self.window[self.steps % DIVERGENCE_WINDOW] = loss
        self.bad += (~torch.isfinite(loss)).double()
        self.steps, self.classes = self.steps + 1, classes

    def due(self, i: int, n: int) -> bool:
        return (i + 1) % DIVERGENCE_WINDOW == 0 or i + 1 == n

    def check(self) -> None:
        kept = min(self.steps, DIVERGENCE_WINDOW)
        bad, mean = self.where.sum(torch.stack([self.bad, self.window[:kept].mean()])).tolist()
        mean /= self.where.replicas  # a pipeline's processes each add their own heads' losses
        if bad > 0 or not math.isfinite(mean):
            raise Diverged(self.steps, math.nan, math.nan)
        if self.factor <= 0:
            return
        if self.level is None:  # the stage's first window: its starting level
            self.level = max(mean, math.log(max(self.classes, 2)))
        elif mean > self.factor * self.level:
            raise Diverged(self.steps, mean, self.factor * self.level)


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

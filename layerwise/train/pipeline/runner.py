"""The pipeline's StageRunner: this process's blocks of the decoupled stage, trained on what the process before it
sends, with an epoch loop and an evaluation of their own (the package's docstring says how)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from layerwise.config import RunConfig
from layerwise.device import Precision
from layerwise.distributed import ALONE, Dist, Replicas
from layerwise.errors import LayerwiseError
from layerwise.evaluate import COUNTS, add_to_ensemble, counted, evaluating, figures, mirror_mean, with_mirrors
from layerwise.models.staged import StagedNet
from layerwise.stages import Stage
from layerwise.train.checkpoint import cpu_snapshot
from layerwise.train.loop import Counting, StageTraining, Tally, train_steps
from layerwise.train.pipeline.pipe import Pipe
from layerwise.train.pipeline.placement import Placement, place_blocks
from layerwise.train.pipeline.replay import Received
from layerwise.train.resume import Resume
from layerwise.train.runner import Parts, StageRunner


@dataclass(frozen=True)
class Seat:
    """A pipeline process's place: its data-parallel replicas (the same blocks in other pipelines) and its link to
    the processes before and after it."""

    replicas: Replicas
    pipe: Pipe


class PipelineTraining(StageTraining):
    """StageTraining of a pipeline process's blocks: after each forward pass the last block's output goes on to the
    next process with the labels, which starts on the batch while this one updates."""

    keeps_output = True

    def __init__(self, net: StagedNet, stage: Stage, cfg: RunConfig, precision: Precision, seat: Seat):
        super().__init__(net, stage, cfg, precision, seat.replicas)
        self.pipe = seat.pipe

    def forwarded(self, y: torch.Tensor) -> None:
        output = self.module.take_output()  # (B, C, H, W), detached; the pipe holds it until sent
        if self.pipe.next is not None:
            self.pipe.send(output, y)


@dataclass(frozen=True)
class AllHeads:
    """What the pipeline's divergence check adds up: every process's own heads' losses, over the run's processes,
    counted once per replica of the pipeline."""

    where: Dist
    count: int

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.where.sum(t)


def processes_per_pipeline(where: Dist, cfg: RunConfig) -> int:
    """P: the processes torchrun started form world / P replicas of a P-process pipeline (train.pipeline_processes;
    0: one pipeline of every process). Refused in one line when there is a single process or P does not divide the
    processes."""
    P = cfg.train.pipeline_processes or where.world_size
    if not where.active or P < 2:
        raise LayerwiseError(
            "train.placement=pipeline runs one group of blocks per process: start it with torchrun "
            "--nproc-per-node N, and P = train.pipeline_processes (default N) between 2 and the number of blocks"
        )
    if where.world_size % P:
        raise LayerwiseError(
            f"train.pipeline_processes={P} must divide the {where.world_size} processes torchrun started (each "
            "replica of the pipeline has P of them)"
        )
    if cfg.train.replay and where.world_size > P:
        raise LayerwiseError(
            "train.replay cannot be combined with replicas of the pipeline (train.pipeline_processes below the "
            "processes): with replays the replicas train different numbers of steps, which DDP cannot all-reduce"
        )
    return P


class PipelineRunner(StageRunner):
    """train.placement=pipeline: rank r is position r % P of pipeline replica r // P and holds the blocks of
    Placement.groups[r % P]; the replicas of a position split each batch (DDP among them)."""

    def __init__(self, parts: Parts, replicas: Replicas, resuming: bool = False):
        where, R = parts.where, replicas.count
        P = where.world_size // R
        # every process makes every group, in the same order (torch.distributed.new_group): each replica's
        # pipeline, then each position's replicas (DDP among them)
        pipes = [dist.new_group([r * P + p for p in range(P)]) for r in range(R)]
        parallel = [dist.new_group([r * P + p for r in range(R)]) for p in range(P)] if R > 1 else [None] * P
        self.P, self.position = P, where.rank % P
        super().__init__(parts, replace(replicas, group=parallel[self.position]), resuming)
        self.judges_alone = parts.cfg.train.replay > 0  # with replays each process trains its own number of steps
        prev = where.rank - 1 if self.position > 0 else None
        next = where.rank + 1 if self.position + 1 < P else None
        self.pipe = Pipe(prev, next, parts.precision.device, pipes[replicas.index])
        self.placement: Placement = where.agree(lambda: place_blocks(parts, P, resuming))
        self.part = self.placement.stage(self.position)  # this process's blocks of the stage

    @staticmethod
    def replicas_for(where: Dist, cfg: RunConfig) -> Replicas:
        P = processes_per_pipeline(where, cfg)
        return Replicas(index=where.rank // P, count=where.world_size // P, root=where.rank % P)

    @staticmethod
    def sized_as(mode: str) -> str:
        # a pipeline process holds a group of blocks, at least one: sized as a greedy stage is (a lower bound)
        return "greedy"

    def info(self) -> dict[str, Any]:
        return {"pipeline": self.placement.to_json()}  # resume reuses the grouping

    @contextmanager
    def prepare(self, stage: Stage, start: Resume) -> Iterator[int]:
        parts, cfg = self.parts, self.parts.cfg.train
        training = PipelineTraining(parts.net, self.part, parts.cfg, parts.precision, Seat(self.replicas, self.pipe))
        # with replays each process watches its own losses; only rank 0's level is saved: the others measure
        # theirs again when resumed
        level = start.loss_level if not cfg.replay or parts.where.is_main else None
        training.load_state(start.state, level)
        self.training, self.loader = training, parts.data.train
        if self.part.first > 0:
            self.loader = Received(self.pipe, parts.data.train, self.part.first, cfg.replay, cfg.replay_reuse)
        try:
            yield training.epochs
        finally:
            self.training = self.loader = None

    def train(self, seed: int, epoch: int, desc: str) -> dict:
        """train_epoch for a pipeline process: its figures cover the whole stage's heads (each process fills its
        own, the all-reduce the rest), with replays each process checks its own losses, and the epoch's end is
        sent on."""
        training, loader, where, cfg = self.training, self.loader, self.parts.where, self.parts.cfg.train
        replaying = cfg.replay > 0
        extra = ("replays", "dropped") if replaying else ()
        tally = Tally(tuple(range(self.parts.net.J)), training.stage.loss_heads, loader.device, extra)
        over = ALONE if replaying else AllHeads(where, self.replicas.count)
        t0 = time.perf_counter()
        train_steps(training, loader, seed, epoch, desc, Counting(tally, over, shown=where.is_main))
        for column in extra:  # this epoch's counts of a process after the first (Received)
            tally.set(column, float(getattr(loader, column, 0)))
        if self.pipe.next is not None:
            self.pipe.send_end()
            self.pipe.flush()
        images = tally.n if self.position == 0 else 0  # every process sees the same images: count them once
        return tally.figures(where.sum, images, t0)

    def evaluate(self, stage: Stage, loader, memo: dict) -> dict:
        """evaluate() over every head 0..J-1 when this process holds only its blocks: the first process reads the
        loader, each one runs its blocks and heads, adds its heads to the running ensemble and passes the output
        and the ensemble on. Counts are all-reduced, each head's row filled by its process."""
        net, part, pipe, cfg = self.parts.net, self.part, self.pipe, self.parts.cfg.train
        counts = torch.zeros(net.J, len(COUNTS), dtype=torch.float64, device=pipe.device)  # (J, COUNTS)
        n = 0
        batches = loader.batches() if part.first == 0 else (pipe.recv(3) for _ in range(len(loader)))
        with evaluating(net):
            for item in batches:
                x, y, total = (*item, None) if part.first == 0 else item  # total: (B, classes), the ensemble so far
                if cfg.eval_flip and part.first == 0:  # the mirrored images travel with the images
                    x = with_mirrors(x)  # (2B, C, H, W)
                with torch.no_grad(), self.parts.precision.autocast():
                    for j in part.trained_blocks:
                        x = net.blocks[j](x)
                        z = net.heads[j](x)  # (B or 2B, classes)
                        z = mirror_mean(z, len(y)) if cfg.eval_flip else z  # (B, classes)
                        total = add_to_ensemble(total, z, cfg.ensemble)
                        counts[j] += counted(z, total, y)
                if pipe.next is not None:
                    pipe.send(x, y, total)
                n += len(y)
            pipe.flush()
        return figures(list(range(net.J)), counts, n if part.first == 0 else 0, self.parts.where)

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Rank 0 gathers every process's blocks and optimizers, and saves them all."""
        meta = {"loss_level": self.training.loss_level, "pipeline": self.placement.to_json()}
        return meta, {"optimizer": self.gather_to_main()}

    def gather_to_main(self) -> dict | None:
        """After an epoch: every process sends its blocks' and heads' weights and buffers and their optimizers'
        states to rank 0, which loads the weights into its network (where they sit on the CPU). Returns, on rank 0,
        the optimizer state of every block ({"blocks": {"j": state}}) for the checkpoint; None elsewhere. Replicas
        of a pipeline hold the same weights (DDP): rank 0 takes replica 0's."""
        net, where = self.parts.net, self.parts.where
        prefixes = tuple(f"{kind}.{j}." for j in self.part.trained_blocks for kind in ("blocks", "heads"))
        mine = {k: v for k, v in net.state_dict().items() if k.startswith(prefixes)}
        payload = (cpu_snapshot(mine), cpu_snapshot(self.training.optimizer.state_dict()["blocks"]))
        gathered = [None] * where.world_size if where.is_main else None
        dist.gather_object(payload, gathered, dst=0)
        if not where.is_main:
            return None
        own = net.state_dict()
        blocks = {}
        for weights, states in gathered[: self.P]:  # replica 0's processes
            with torch.no_grad():
                for key, value in weights.items():
                    own[key].copy_(value)
            blocks.update(states)
        return {"blocks": blocks}

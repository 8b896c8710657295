"""The seam between a run and how its stages are computed in this process (StageRunner), and the runner of one
process or of data-parallel processes that each hold the whole stage (LocalRunner, with the prefix cache).

A run (train/run.py) asks its runner to `prepare` each stage (resuming from an epoch checkpoint's state), to train
an `epoch`, to `evaluate` the stage's heads and for the `state` its epoch checkpoint keeps. train/pipeline/ has
the other runner, which puts groups of blocks in different processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from layerwise.config import RunConfig
from layerwise.data import DataBundle
from layerwise.device import Precision
from layerwise.distributed import Dist, Replicas
from layerwise.evaluate import evaluate
from layerwise.models.staged import StagedNet
from layerwise.rundir import RunDir
from layerwise.stages import Stage, plan_stages
from layerwise.train.cache import CachePlan, PrefixCache, cache_views, check_cache
from layerwise.train.loop import StageTraining, train_epoch
from layerwise.train.resume import Resume

log = logging.getLogger("layerwise")


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """Each epoch's randomness (shuffle, augmentation, dropout) depends only on these, so resume is exact."""
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**63)


@dataclass(frozen=True)
class Parts:
    """What every stage of a run shares: its config, run directory, network, data, precision and this process's
    place among the run's processes."""

    cfg: RunConfig
    dir: RunDir
    net: StagedNet
    data: DataBundle
    precision: Precision
    where: Dist


class StageRunner:
    """How a run's stages are computed in this process. A runner is built once the network and the data are
    (on every process, checking what it needs before anything is written); then, stage after stage, `prepare`
    sets a stage up, `epoch` trains it one epoch, `evaluated` and `evaluate` score it and `state` gives what its
    epoch checkpoint keeps."""

    judges_alone = False
    """Whether each process checks its own training losses (so each says why it stops), not the run's together."""

    def __init__(self, parts: Parts, replicas: Replicas, resuming: bool = False):
        self.parts, self.replicas, self.resuming = parts, replicas, resuming
        self.training: StageTraining | None = None  # the stage `prepare` set up
        self.loader = None  # its training batches
        self.lr = 0.0  # the learning rate of the epoch in progress

    @staticmethod
    def replicas_for(where: Dist, cfg: RunConfig) -> Replicas:
        """The processes that split each batch, decided before the process group is joined (refusing what cannot
        run) and the data is read (it is sharded among them); the runner makes their process group."""
        return where.replicas

    @staticmethod
    def sized_as(mode: str) -> str:
        """The strategy the network's memory is sized for (network.checked_model)."""
        return mode

    def info(self) -> dict[str, Any]:
        """What run.json records of the runner (resume reads it back)."""
        return {}

    def prepare(self, stage: Stage, start: Resume) -> AbstractContextManager[int]:
        """Set `stage` up from `start` for the duration; gives its number of epochs."""
        raise NotImplementedError

    def epoch(self, epoch: int, desc: str) -> tuple[float, dict]:
        """Train the prepared stage one epoch: (its learning rate, train_epoch's figures). Every replica then holds
        replica 0's buffers."""
        training, cfg = self.training, self.parts.cfg.train
        seed = epoch_seed(cfg.seed, training.stage.index, epoch)
        replica = (seed + 7_919 * self.replicas.index) % 2**63  # dropout masks differ between data-parallel processes
        torch.manual_seed(replica)
        lr = self.lr = training.start_epoch(epoch, replica, len(self.loader))
        stats = self.train(seed, epoch, desc)
        training.sync()
        return lr, stats

    def train(self, seed: int, epoch: int, desc: str) -> dict:
        return train_epoch(self.training, self.loader, seed, epoch, desc)

    def evaluated(self, finished: bool) -> AbstractContextManager[None]:
        """The weights an epoch's evaluation scores (StageTraining.evaluated)."""
        return self.training.evaluated(finished)

    def evaluate(self, stage: Stage, loader, memo: dict) -> dict:
        """evaluate() of the stage's heads over `loader`, with the frozen heads' scores kept in `memo`."""
        classify = self.parts.net.classifying  # a head that does not classify has nothing to score
        heads, cfg = [j for j in stage.eval_heads if j in classify], self.parts.cfg.train
        # only when the heads before the last are frozen may evaluate() keep their scores
        frozen = set(stage.frozen_heads) & set(heads) == set(heads[:-1])
        autocast = self.parts.precision.autocast
        memo = memo if frozen else None
        return evaluate(self.parts.net, loader, heads, cfg.ensemble, autocast, memo, self.parts.where, cfg.eval_flip)

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the epoch checkpoint's metadata from the runner, its states besides the network's), on rank 0."""
        return {"loss_level": self.training.loss_level}, self.training.state()


class LocalRunner(StageRunner):
    """Every process holds the whole stage: one process, or DDP over all of them. A greedy stage after the first
    trains on the prefix cache when train.cache asks for one."""

    def __init__(self, parts: Parts, replicas: Replicas, resuming: bool = False):
        super().__init__(parts, replicas, resuming)
        cfg, where = parts.cfg.train, parts.where
        if cfg.cache != "none" and any(s.cacheable for s in plan_stages(parts.net.J, cfg.mode)):
            where.agree(lambda: parts.dir.remove_cache_files() if where.is_main else None)  # stale files count as used
            where.agree(lambda: check_cache(parts.net, parts.data.train, cfg, parts.precision, where, self.cache_dir))

    @property
    def cache_dir(self):
        return self.parts.dir.path / "cache"

    @contextmanager
    def prepare(self, stage: Stage, start: Resume) -> Iterator[int]:
        parts, cfg = self.parts, self.parts.cfg.train
        self.training = StageTraining(parts.net, stage, parts.cfg, parts.precision, self.replicas)
        self.training.load_state(start.state, start.loss_level)
        self.loader = self.prefix_cache(stage) if cfg.cache != "none" and stage.cacheable else parts.data.train
        try:
            yield self.training.epochs
        finally:  # also on an interruption: free the cache and delete its file
            if isinstance(self.loader, PrefixCache):
                self.loader.close()
            self.training = self.loader = None

    def prefix_cache(self, stage: Stage) -> PrefixCache:
        t0 = time.perf_counter()
        parts, cfg = self.parts, self.parts.cfg.train
        seeds = [epoch_seed(cfg.seed, stage.index, v) for v in range(cache_views(cfg, stage))]
        store = cfg.cache
        if cfg.cache == "disk":  # one file per process under DDP
            store = self.cache_dir / (f"prefix{stage.first}.rank{parts.where.rank}.bin" if parts.where.active
                                      else f"prefix{stage.first}.bin")  # fmt: skip
        plan = CachePlan(stage.first, tuple(seeds), store, parts.dir.path)
        cache = PrefixCache(parts.net, parts.data.train, plan, parts.precision)
        log.info(
            "%s: cached %d view(s) of the frozen prefix in %.1f s", stage.name, len(seeds), time.perf_counter() - t0
        )
        return cache

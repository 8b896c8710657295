"""A whole training run as one object (Run): it opens the run directory, goes through the strategy's stages and
their epochs on its StageRunner (train/runner.py), and hands each epoch's metrics line and checkpoint to the writer.

Under torchrun every process builds the same Run; rank 0 alone writes the run directory (config, logs,
metrics, checkpoints, summary), and every process reads its checkpoints when resuming.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from layerwise.config import RunConfig
from layerwise.data import build_data
from layerwise.device import Precision
from layerwise.distributed import (
    Dist,
    QuietError,
    check_batch,
    compute_for,
    elastic_attempt,
    from_env,
    is_peer_failure,
    peer_failure,
    process_group,
    stop_quietly,
)
from layerwise.errors import LayerwiseError
from layerwise.network import checked_model
from layerwise.rundir import RunDir, run_info
from layerwise.stages import Stage, plan_stages
from layerwise.train.adaptive import AdaptiveDepth
from layerwise.train.checkpoint import BackgroundWriter, checkpoint_job
from layerwise.train.divergence import Diverged
from layerwise.train.metrics import Callback, epoch_row, format_row, sinks, summarize
from layerwise.train.pipeline import PipelineRunner
from layerwise.train.preflight import preflight
from layerwise.train.resume import Resume, elastic_restart_of, resume_point, same_run
from layerwise.train.runner import LocalRunner, Parts, StageRunner

log = logging.getLogger("layerwise")

RUNNERS: dict[str, type[StageRunner]] = {"single": LocalRunner, "pipeline": PipelineRunner}
"""The runner of each train.placement."""


def train(
    cfg: RunConfig,
    out: str | Path,
    data: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train cfg's network into the run directory `out` and return the summary. See RunDir for the files.

    `data` is a dataset path (None: the built-in sample). With `resume`, an interrupted run continues from
    its last finished epoch and ends exactly where an uninterrupted run would. Under torchrun this process
    joins the run's process group (NCCL on GPUs, gloo on the CPU) for the duration, unless it already has.
    """
    where = from_env()
    replicas = RUNNERS[cfg.train.placement].replicas_for(where, cfg)  # what cannot run, before joining the others
    check_batch(cfg.train.batch_size, replicas.count)
    compute = compute_for(cfg.train, where)
    with process_group(where, compute.device):
        if not resume and where.from_main(elastic_restart_of(out) if where.is_main else None):
            log.info("torchrun restarted the job (restart %d): resuming %s", elastic_attempt(), out)
            resume = True
        run = Run.open(cfg, out, data, resume, where, compute)
        try:
            return run.train(on_epoch_end)
        finally:
            run.close()


class Run:
    """A run set up to train: what every stage shares (`parts`), this process's StageRunner, and the stages of the
    strategy. `Run.open` sets it up; `train` trains it."""

    def __init__(self, parts: Parts, runner: StageRunner, resuming: bool, lock=None):
        self.parts, self.runner, self.resuming, self.lock = parts, runner, resuming, lock
        self.cfg, self.dir, self.net, self.where = parts.cfg, parts.dir, parts.net, parts.where
        self.stages = plan_stages(self.net.J, self.cfg.train.mode)
        self.writer: BackgroundWriter | None = None
        self.log_handler: logging.Handler | None = None
        self.sinks: list = []  # where each epoch's metrics line goes besides metrics.jsonl (metrics.sinks)
        self.depth: AdaptiveDepth | None = None

    @classmethod
    def open(
        cls, cfg: RunConfig, out: str | Path, data: str | Path | None, resume: bool, where: Dist, precision: Precision
    ) -> Run:
        """Check everything that can fail before anything is written (on every process: none goes on alone),
        then, on rank 0, take the run directory's lock and write the config, classes and run.json."""
        kind = RUNNERS[cfg.train.placement]
        run_dir = RunDir(out)
        locks = []

        def check_dir() -> None:
            if resume:
                same_run(run_dir.saved_config(), cfg)
            else:
                run_dir.check_new()
            if where.is_main:
                locks.append(run_dir.lock())
                if not resume:
                    run_dir.check_new()  # another run may have started here since the check above

        try:
            replicas = kind.replicas_for(where, cfg)
            check_batch(cfg.train.batch_size, replicas.count)
            where.agree(check_dir)
            if resume and data is None:  # continue on the data the run started with
                data = run_dir.read_info().get("data_path")
            torch.manual_seed(cfg.train.seed)
            batch, eval_size, shards = cfg.train.batch_size, cfg.train.train_eval_size, replicas.shards(where)
            bundle = where.agree(lambda: build_data(cfg.data, data, batch, precision.device, eval_size, shards))
            log.info(
                "data: %s; %d train, %d val images", bundle.description, bundle.train.num_examples, bundle.val_images
            )
            mode, classes = kind.sized_as(cfg.train.mode), len(bundle.classes)
            net = where.agree(lambda: checked_model(cfg, classes, precision, mode=mode, processes=replicas.count))
            preflight(cfg, bundle, net)
            parts = Parts(cfg, run_dir, net, bundle, precision, where)
            runner = kind(parts, replicas, resume)
            run = cls(parts, runner, resume, locks[0] if locks else None)
            if resume:
                where.agree(run.check_classes)
            where.agree(lambda: run.write_start(data) if where.is_main else None)
            return run
        except BaseException:
            for lock in locks:
                lock.release(undo=not resume)
            raise

    def check_classes(self) -> None:
        if self.dir.read_classes() != self.parts.data.classes:
            raise LayerwiseError(
                f"--resume: the data's classes differ from the run's {self.dir.classes}; pass the same --data"
            )

    def write_start(self, data: str | Path | None) -> None:
        """Rank 0: the config and classes of a new run, run.json (noting a resumption), and train.log."""
        if not self.resuming:
            self.dir.create(self.cfg.to_yaml())
            self.dir.write_json(self.dir.classes, self.parts.data.classes)
        info = {**run_info(self.parts.precision.device, data, self.parts.data.description, self.where),
                **self.runner.info()}  # fmt: skip
        if self.resuming:  # keep when the run started; note when it was resumed
            old = self.dir.read_info()
            info = {**info, "started": old.get("started"), "resumed": [*old.get("resumed", []), info["started"]]}
        self.dir.write_json(self.dir.info, info)
        self.log_handler = self.dir.log_handler()
        self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(self.log_handler)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self.log_handler is not None:
            log.removeHandler(self.log_handler)
            self.log_handler.close()
            self.log_handler = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def train(self, on_epoch_end: Callable[[dict], None] | None = None) -> dict[str, Any]:
        """Every stage from where the run stands (its newest checkpoint when resuming) to the end; the summary.

        `on_epoch_end(row)` runs after each epoch, while its metrics line and checkpoint are being written.
        """
        main, cfg = self.where.is_main, self.cfg.train
        start = Resume()
        if self.resuming:
            start = self.where.agree(lambda: resume_point(self.dir, self.net, self.stages, self.cfg, main))
        rows = self.where.agree(lambda: self.dir.read_metrics() if main else [])  # after resume_point's drops
        self.sinks = sinks(self.cfg, self.dir.path, main, len(rows))
        self.sinks += [Callback(on_epoch_end)] if on_epoch_end is not None else []
        finished = self.where.from_main(AdaptiveDepth.finished(rows) if main else None)
        self.depth = AdaptiveDepth(cfg.min_gain, finished, self.stages[: start.stage], self.dir.checkpoints)
        t_start = time.perf_counter()
        try:
            with BackgroundWriter() as self.writer:  # checkpoints and metrics go to disk while training goes on
                for stage in self.stages[start.stage :] if self.depth.stopped is None else []:
                    self.train_stage(stage, start if stage.index == start.stage else Resume(stage.index))
                    if stage.finishes_block:
                        self.save(self.dir.block(stage.block), {"block": stage.block, "stage": stage.index})
                    if self.depth.decide(stage) is not None:
                        log.info("adaptive depth: %s", self.depth.stopped["reason"])
                        break
                if start.stage < len(self.stages) or not self.dir.final.is_file():
                    delivered = self.depth.delivered(self.net.J)
                    self.save(self.dir.final, {"mode": cfg.mode, "blocks_trained": delivered})
            # Rank 0 alone writes the summary; every process returns it, or stops with its error.
            return self.where.from_main(self.where.agree(lambda: self.write_summary(t_start)))
        except RuntimeError as e:
            if not (self.where.active and is_peer_failure(e)):
                raise
            if stop_quietly(self.where):  # the process that failed first has said why
                raise QuietError(f"process {self.where.rank} stopped: another process of the run failed") from None
            raise LayerwiseError(
                f"process {self.where.rank} stopped: another process of the run failed ({peer_failure(e)}); the "
                f"checkpoints in {self.dir.checkpoints} are intact: start the same command again with --resume"
            ) from None
        finally:
            self.writer = None

    def write_summary(self, t_start: float) -> dict[str, Any] | None:
        if not self.where.is_main:
            return None
        seconds, rows = time.perf_counter() - t_start, self.dir.read_metrics()
        summary = summarize(
            self.cfg, self.net, rows, self.depth.trained(self.stages), seconds, self.parts.precision.device
        )
        self.depth.amend(summary, self.net)
        self.dir.write_json(self.dir.summary, summary)
        return summary

    def train_stage(self, stage: Stage, start: Resume) -> None:
        """The stage from `start.epoch` on, from the state of a resumed epoch."""
        compile_errors = (torch._dynamo.exc.TorchDynamoException,) if self.cfg.train.compile != "none" else ()
        memos = {"val": {}, "train_eval": {}}  # the frozen heads' scores, kept through the stage's evaluations
        with self.runner.prepare(stage, start) as epochs:
            for epoch in range(start.epoch, epochs):
                try:
                    self.train_epoch(stage, epoch, epochs, memos)
                except compile_errors as e:
                    raise LayerwiseError(
                        f"train.compile={self.cfg.train.compile} failed in {stage.name} "
                        f"({str(e).strip().splitlines()[0]}); checkpoints are kept in {self.dir.checkpoints}: resume "
                        "with --set train.compile=none"
                    ) from None

    def train_epoch(self, stage: Stage, epoch: int, epochs: int, memos: dict) -> None:
        """Train, stop on a non-finite loss, evaluate, then hand the metrics line and the epoch checkpoint to the
        writer (in that order, so no checkpoint is ahead of its metrics); the sinks get the line meanwhile."""
        cfg, main = self.cfg.train, self.where.is_main
        # one process says it, every process stops; a runner whose processes judge alone has each say it
        fail = LayerwiseError if main or self.runner.judges_alone else QuietError
        kept = f"checkpoints up to the previous epoch are kept in {self.dir.checkpoints}"
        try:
            lr, stats = self.runner.epoch(epoch, f"{stage.name} epoch {epoch + 1}/{epochs}")
        except Diverged as e:
            what = (
                "became non-finite"
                if math.isnan(e.mean)
                else f"diverged: its mean over the last steps is {e.mean:.3g}, above {e.limit:.3g} "
                f"(train.divergence_factor x the stage's starting level)"
            )
            raise fail(
                f"{stage.name}'s training loss {what} at step {e.step} of epoch {epoch + 1} "
                f"(lr {self.runner.lr:g}); {kept}; lower --lr or raise --batch-size, then --resume"
            ) from None
        except torch.OutOfMemoryError:
            per_process = cfg.batch_size // self.runner.replicas.count
            raise LayerwiseError(
                f"out of memory on {self.parts.precision.device} in {stage.name}, epoch {epoch + 1}, at {per_process} "
                f"images per step; {kept}; lower --batch-size, or --set train.recompute_activations=true, "
                "train.precision=bf16 or train.cache=host, then --resume"
            ) from None
        if not math.isfinite(stats["loss"]):  # the same all-reduced loss on every process
            raise (LayerwiseError if main else QuietError)(
                f"training loss became {stats['loss']} in {stage.name}, epoch {epoch + 1} (lr {lr:g}); {kept}; "
                "start again with a lower --lr"
            )
        loaders = {"val": self.parts.data.val, "train_eval": self.parts.data.train_eval}  # None: not in this run
        with self.runner.evaluated(finished=epoch + 1 == epochs):
            scored = {
                key: self.runner.evaluate(stage, loader, memos[key])
                for key, loader in loaders.items()
                if loader is not None
            }
        row = {**epoch_row(stage, epoch, lr, stats, scored), **self.data_counts()}
        self.depth.record(row)
        extra, states = self.runner.state()
        meta = {"stage": stage.index, "stage_name": stage.name, "block": stage.block, "epoch": epoch + 1, "lr": lr,
                **extra}  # fmt: skip
        line = copy.deepcopy(row)  # the sinks get row while the worker writes this copy
        self.save(self.dir.last, meta, states, first=lambda: self.dir.append_metrics(line))
        log.info(format_row(row))
        for sink in self.sinks:
            sink.add(row)

    def data_counts(self) -> dict[str, dict[str, int]]:
        """{"data": the epoch's repeated, dropped and skipped images over every process}, for a loader that has
        them (shard_loader.py), else {}. Every process has the same kind of loader, so all or none sum."""
        counts = self.parts.data.train.epoch_counts()
        if not counts:
            return {}
        values = torch.tensor(list(counts.values()), dtype=torch.int64, device=self.parts.precision.device)
        summed = self.where.sum(values)
        return {"data": dict(zip(counts, summed.tolist(), strict=True))}

    def save(self, path: Path, meta: dict, states=None, first: Callable[[], None] | None = None) -> None:
        """Rank 0: snapshot the weights (and `states`) now; the writer runs `first`, if given, then saves them
        while training goes on."""
        if self.where.is_main:
            self.writer.submit(checkpoint_job(path, meta, self.net, states, first, self.dir.path))

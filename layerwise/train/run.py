"""A whole training run as one object (Run): set-up, every stage of the strategy, metrics, checkpoints, resume.

Under torchrun every process builds the same Run; rank 0 alone writes the run directory (config, logs,
metrics, checkpoints, summary), and every process reads its checkpoints when resuming.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerwise._version import __version__
from layerwise.config import RunConfig, config_from_dict
from layerwise.data import DataBundle, build_data
from layerwise.data.loaders import MemoryLoader
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
from layerwise.evaluate import evaluate
from layerwise.models.staged import StagedNet, count
from layerwise.network import checked_model
from layerwise.rundir import RunDir, load_checkpoint
from layerwise.safe_io import folder
from layerwise.stages import Stage, module_bytes, plan_stages, resident_modules
from layerwise.train.cache import PrefixCache, cache_bytes, check_cache_fits, human, prefix_shapes
from layerwise.train.checkpoint import BackgroundWriter, checkpoint_job, save_checkpoint
from layerwise.train.divergence import Diverged
from layerwise.train.loop import StageTraining, Wiring, train_epoch
from layerwise.train.pipeline import (
    GatheredState,
    Pipe,
    Placement,
    Received,
    balance,
    evaluate_pipelined,
    gather_to_main,
    measure_blocks,
    pipeline_groups,
    pipelined,
)
from layerwise.train.schedule import stage_epochs
from layerwise.train.summary import final_scores, format_row, summarize

log = logging.getLogger("layerwise")


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """Each epoch's randomness (shuffle, augmentation, dropout) depends only on these, so resume is exact."""
    return (seed * 1_000_003 + stage * 10_007 + epoch) % (2**63)


RESUMABLE_CHANGES = (
    "device",
    "precision",
    "recompute_activations",
    "compile",
    "divergence_factor",
    "num_classes",
    "tensorboard",
)
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
    its last finished epoch and ends exactly where an uninterrupted run would. Under torchrun this process
    joins the run's process group (NCCL on GPUs, gloo on the CPU) for the duration, unless it already has.
    """
    where = pipelined(from_env(), cfg)
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


@dataclass
class Resume:
    """Where training continues: a stage, the epochs of it already done, and their optimizer state."""

    stage: int = 0
    epoch: int = 0
    optimizer_state: dict | None = None
    loss_level: float | None = None
    """The stage's starting loss level for the divergence check (train.divergence.LossWatch)."""


class Run:
    """What every stage of a run shares: its config, run directory, network, data, precision and this
    process's place in the process group (`where`). `Run.open` sets it up; `train` trains it."""

    def __init__(
        self, cfg: RunConfig, run_dir: RunDir, net: StagedNet, data: DataBundle, precision: Precision, where: Dist
    ):
        self.cfg, self.dir, self.net, self.data, self.precision, self.where = cfg, run_dir, net, data, precision, where
        self.stages = plan_stages(net.J, cfg.train.mode)
        self.resuming = False
        self.writer: BackgroundWriter | None = None
        self.lock = None
        self.log_handler: logging.Handler | None = None
        self.on_epoch_end: Callable[[dict], None] | None = None
        self.val_top1: dict[int, float] = {}  # each finished epoch's validation top-1, by stage (the last one wins)
        self.stopped: dict[str, Any] | None = None  # train.min_gain's decision, once taken
        self.placement: Placement | None = None  # a pipelined run's block groups, one per process
        self.pipe_group = self.replica_group = None
        self.pipe: Pipe | None = None
        self.board: Board | None = None  # train.tensorboard's event files

    @property
    def device(self) -> torch.device:
        return self.precision.device

    @classmethod
    def open(
        cls, cfg: RunConfig, out: str | Path, data: str | Path | None, resume: bool, where: Dist, precision: Precision
    ) -> Run:
        """Check everything that can fail before anything is written (on every process: none goes on alone),
        then, on rank 0, take the run directory's lock and write the config, classes and run.json."""
        where = pipelined(where, cfg)
        check_batch(cfg.train.batch_size, where)
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
            where.agree(check_dir)
            if resume and data is None:  # continue on the data the run started with
                data = run_dir.read_info().get("data_path")
            torch.manual_seed(cfg.train.seed)
            batch, eval_size = cfg.train.batch_size, cfg.train.train_eval_size
            shards = where.data_view()  # the processes that split each batch (a pipeline's first process reads it)
            bundle = where.agree(lambda: build_data(cfg.data, data, batch, precision.device, eval_size, shards))
            log.info(
                "data: %s; %d train, %d val images", bundle.description, bundle.train.num_examples, bundle.val_images
            )
            if cfg.train.tensorboard:
                Board.check()
            if cfg.train.min_gain is not None and bundle.val is None:
                raise LayerwiseError(
                    "train.min_gain compares the blocks' validation top-1, and this run has none: "
                    "give --val-data, or a data.val_size above 0"
                )
            classes, processes = len(bundle.classes), where.replicas
            # a pipeline process holds a group of blocks, at least one: sized and placed as a greedy stage is (a
            # lower bound), then StageTraining places its own group
            mode = "greedy" if where.pipeline > 1 else cfg.train.mode
            net = where.agree(lambda: checked_model(cfg, classes, precision, mode=mode, processes=processes))
            if cfg.train.block_epochs and len(cfg.train.block_epochs) != net.J:
                raise LayerwiseError(
                    f"train.block_epochs has {len(cfg.train.block_epochs)} numbers for a network of {net.J} blocks; "
                    "give one per block"
                )
            run = cls(cfg, run_dir, net, bundle, precision, where)
            run.lock, run.resuming = locks[0] if locks else None, resume
            if where.pipeline > 1:
                run.placement = where.agree(run.place_blocks)
            if cfg.train.cache != "none" and any(s.cacheable for s in run.stages):
                where.agree(run.remove_stale_cache)  # before any process measures the free space
                where.agree(run.check_cache)
            if resume:
                where.agree(run.check_classes)
            where.agree(lambda: run.write_start(data) if where.is_main else None)
            return run
        except BaseException:
            for lock in locks:
                lock.release(undo=not resume)
            raise

    def place_blocks(self) -> Placement:
        """A pipelined run's block groups: the run's own when resuming (run.json), one block per process when there
        are as many processes as blocks, else measured: rank 0 times each block's training step and cuts the
        blocks into groups of balanced time (pipeline.balance)."""
        J, P = self.net.J, self.where.pipeline
        if P > J:
            raise LayerwiseError(
                f"train.placement=pipeline: {P} processes for {J} blocks; start at most {J} (--nproc-per-node)"
            )
        if self.resuming:
            saved = self.where.from_main(self.dir.read_info().get("pipeline") if self.where.is_main else None)
            placement = Placement.from_json(saved, J)
            if placement.processes != P:
                raise LayerwiseError(
                    f"--resume: the run was pipelined over {placement.processes} processes per pipeline, not {P}; "
                    f"resume it with train.pipeline_processes={placement.processes} (or as many processes)"
                )
            return placement
        if P == J:
            return Placement(tuple((j,) for j in range(J)))
        costs = None
        if self.where.is_main:
            images = (
                self.data.train.normalize(self.data.train.images[:1]) if hasattr(self.data.train, "images") else None
            )
            shape = tuple(images.shape[1:]) if images is not None else (self.cfg.model.in_channels,) + (
                self.cfg.data.image_size,) * 2  # fmt: skip
            batch = self.cfg.train.batch_size // self.where.replicas
            x = torch.randn(batch, *shape, device=self.device)
            y = torch.randint(0, len(self.data.classes), (batch,), device=self.device)
            with self.precision.autocast():
                costs = measure_blocks(self.net, x, y)
            log.info("pipeline: step seconds per block %s", ", ".join(f"{c:.4f}" for c in costs))
        return balance(self.where.from_main(costs), P)

    def check_classes(self) -> None:
        if self.dir.read_classes() != self.data.classes:
            raise LayerwiseError(
                f"--resume: the data's classes differ from the run's {self.dir.classes}; pass the same --data"
            )

    def write_start(self, data: str | Path | None) -> None:
        """Rank 0: the config and classes of a new run, run.json (noting a resumption), and train.log."""
        if not self.resuming:
            self.dir.create(self.cfg.to_yaml())
            self.dir.write_json(self.dir.classes, self.data.classes)
        info = run_info(self.cfg, self.device, data, self.data.description, self.where)
        if self.placement is not None:  # resume reuses the grouping
            info["pipeline"] = self.placement.to_json()
        if self.resuming:  # keep when the run started; note when it was resumed
            old = self.dir.read_info()
            info = {**info, "started": old.get("started"), "resumed": [*old.get("resumed", []), info["started"]]}
        self.dir.write_json(self.dir.info, info)
        self.log_handler = self.dir.log_handler()
        self.log_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(self.log_handler)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
            self.board = None
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
        self.on_epoch_end = on_epoch_end
        start = self.where.agree(self.resume_point) if self.resuming else Resume()
        if self.cfg.train.tensorboard and self.where.is_main:  # after resume_point dropped the lines it redoes
            self.board = Board(self.dir.path, len(self.dir.read_metrics()))
        if self.cfg.train.min_gain is not None:  # the finished stages' scores, which the decisions compare
            self.val_top1 = self.where.from_main(self.finished_val_top1() if self.where.is_main else None)
            self.stopped = next(filter(None, map(self.stop_reason, self.stages[: start.stage])), None)
        t_start = time.perf_counter()
        try:
            with BackgroundWriter() as self.writer:  # checkpoints and metrics go to disk while training goes on
                for stage in self.stages[start.stage :] if self.stopped is None else []:
                    self.train_stage(stage, start if stage.index == start.stage else Resume(stage.index))
                    if stage.finishes_block:
                        self.save(self.dir.block(stage.block), {"block": stage.block, "stage": stage.index})
                    self.stopped = self.stop_reason(stage)
                    if self.stopped is not None:
                        log.info("adaptive depth: %s", self.stopped["reason"])
                        break
                if start.stage < len(self.stages) or not self.dir.final.is_file():
                    delivered = self.net.J if self.stopped is None else self.stopped["blocks_delivered"]
                    self.save(self.dir.final, {"mode": self.cfg.train.mode, "blocks_trained": delivered})
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
        seconds = time.perf_counter() - t_start
        trained = self.stages[: self.stopped["blocks_delivered"] + 1] if self.stopped else self.stages
        summary = summarize(self.cfg, self.net, self.dir.read_metrics(), trained, seconds, self.device)
        if self.stopped is not None:  # the delivered network ends a block before the last one trained
            delivered = self.stopped["blocks_delivered"]
            summary["final"] = final_scores(summary["blocks"][delivered - 1])
            summary["params_final"] = count(self.net.blocks[:delivered]) + count(self.net.heads[delivered - 1])
            summary["adaptive_depth"] = self.stopped
        self.dir.write_json(self.dir.summary, summary)
        return summary

    def finished_val_top1(self) -> dict[int, float]:
        """Rank 0: the validation top-1 of each stage's last epoch in metrics.jsonl (what a resumed run has)."""
        return {r["stage"]: r["val"]["top1"] for r in self.dir.read_metrics() if "val" in r}

    def stop_reason(self, stage: Stage) -> dict[str, Any] | None:
        """train.min_gain after greedy block j > 0: if its head's validation top-1 gained less than min_gain
        points over block j-1's, the decision to stop and deliver blocks 0..j-1; else None."""
        min_gain = self.cfg.train.min_gain
        if min_gain is None or not stage.finishes_block or stage.block == 0:
            return None
        if not {stage.index - 1, stage.index} <= self.val_top1.keys():
            raise LayerwiseError(
                f"train.min_gain needs the validation top-1 of blocks {stage.block - 1} and {stage.block}, which "
                f"metrics.jsonl lacks; the trained weights are in {self.dir.checkpoints}"
            )
        before, after = self.val_top1[stage.index - 1], self.val_top1[stage.index]
        if after - before >= min_gain:
            return None
        return {
            "min_gain": min_gain,
            "blocks_delivered": stage.block,
            "reason": f"block {stage.block}'s head reached validation top-1 {after:.2f}, {after - before:+.2f} points "
            f"over block {stage.block - 1}'s {before:.2f}, less than train.min_gain={min_gain:g}: "
            f"the run delivers blocks 0-{stage.block - 1} and their heads",
        }

    def resume_point(self) -> Resume:
        """Load the newest checkpoint into the network; return where to continue from.

        final.pt (finished) > last.pt (end of an epoch) > the newest block{j}.pt (end of a greedy block).
        Rank 0 drops the metric lines the checkpoint does not cover.
        """
        run, main = self.dir, self.where.is_main
        if run.final.is_file():
            _, model_state, _ = load_checkpoint(run.final)
            self.net.load_state_dict(model_state)
            log.info("%s already finished; rewriting its summary", run.path)
            return Resume(len(self.stages))
        if run.last.is_file():
            meta, model_state, optimizer_state = load_checkpoint(run.last)
            self.net.load_state_dict(model_state)
            stage, epoch = self.stages[meta["stage"]], meta["epoch"]
            if main:
                run.keep_metrics(lambda r: (r["stage"], r["epoch"]) <= (stage.index, epoch))
            log.info("resuming %s after stage %d epoch %d", run.path, stage.index, epoch)
            if epoch < stage_epochs(self.cfg.train, stage):
                return Resume(stage.index, epoch, optimizer_state, meta.get("loss_level"))
            if main and stage.finishes_block and not run.block(stage.block).is_file():  # stopped before saving it
                meta = {"block": stage.block, "stage": stage.index}
                save_checkpoint(run.block(stage.block), meta, model_state, root=run.path)
            return Resume(stage.index + 1)
        block = run.last_finished_block()
        if block is not None:  # last.pt was lost: continue after the last finished block
            meta, model_state, _ = load_checkpoint(block)
            self.net.load_state_dict(model_state)
            if main:
                run.keep_metrics(lambda r: r["stage"] <= meta["stage"])
            log.info("resuming %s after %s (no last.pt)", run.path, block.name)
            return Resume(meta["stage"] + 1)
        if main:
            run.keep_metrics(lambda r: False)
        log.info("no checkpoint in %s yet: starting from the beginning", run.checkpoints)
        return Resume()

    def train_stage(self, stage: Stage, start: Resume) -> None:
        """The stage from `start.epoch` on (with the optimizer state of a resumed epoch), on the prefix cache when
        train.cache asks for one."""
        cfg = self.cfg.train
        if self.placement is not None:  # this process's blocks of the stage, fed by the process before it
            local, pipe = self.pipeline_part()
            downstream = pipe if pipe.next is not None else None
            # with replays each process watches its own losses; only rank 0's level is saved: the others measure
            # theirs again when resumed
            level = start.loss_level if not cfg.replay or self.where.is_main else None
            wiring = Wiring(downstream, stage.loss_heads, self.replica_group)
            training = StageTraining(
                self.net, local, cfg, self.precision, self.where, start.optimizer_state, level, wiring
            )
            loader = self.data.train
            if local.first > 0:
                loader = Received(pipe, self.data.train, local.first, cfg.replay, cfg.replay_reuse)
        else:
            training = StageTraining(
                self.net, stage, cfg, self.precision, self.where, start.optimizer_state, start.loss_level
            )
            loader = self.prefix_cache(stage) if cfg.cache != "none" and stage.cacheable else self.data.train
        compile_errors = (torch._dynamo.exc.TorchDynamoException,) if cfg.compile != "none" else ()
        memos = {"val": {}, "train_eval": {}}  # the frozen heads' scores, kept through the stage's evaluations
        try:
            for epoch in range(start.epoch, training.epochs):
                try:
                    self.train_epoch(training, loader, epoch, memos)
                except compile_errors as e:
                    raise LayerwiseError(
                        f"train.compile={cfg.compile} failed in {stage.name} ({str(e).strip().splitlines()[0]}); "
                        f"checkpoints are kept in {self.dir.checkpoints}: resume with --set train.compile=none"
                    ) from None
        finally:  # also on an interruption: free the cache and delete its file
            if isinstance(loader, PrefixCache):
                loader.close()

    def pipeline_part(self) -> tuple[Stage, Pipe]:
        """This process's part of a pipelined stage, and its link to the processes before and after it, in a
        process group of the pipeline's own."""
        if self.pipe_group is None:
            self.pipe_group, self.replica_group = pipeline_groups(self.where)
        rank, p, P = self.where.rank, self.where.position, self.where.pipeline
        prev, next = (rank - 1 if p > 0 else None), (rank + 1 if p + 1 < P else None)
        self.pipe = Pipe(prev, next, self.device, self.pipe_group)
        return self.placement.stage(p), self.pipe

    def train_epoch(self, training: StageTraining, loader, epoch: int, memos: dict) -> None:
        """Train, stop on a non-finite loss, evaluate, then hand the metrics line and the epoch checkpoint to the
        writer (in that order, so no checkpoint is ahead of its metrics); on_epoch_end runs while they are written."""
        stage, cfg = training.stage, self.cfg.train
        seed = epoch_seed(cfg.seed, stage.index, epoch)
        replica = (seed + 7_919 * self.where.replica) % 2**63  # dropout masks differ between data-parallel processes
        torch.manual_seed(replica)
        lr = training.start_epoch(epoch, replica, len(loader))
        # one process says it, every process stops; with replays each process checks its own losses alone
        fail = LayerwiseError if self.where.is_main or cfg.replay else QuietError
        kept = f"checkpoints up to the previous epoch are kept in {self.dir.checkpoints}"
        try:
            stats = train_epoch(training, loader, seed, epoch, f"{stage.name} epoch {epoch + 1}/{training.epochs}")
        except Diverged as e:
            what = (
                "became non-finite"
                if math.isnan(e.mean)
                else f"diverged: its mean over the last steps is {e.mean:.3g}, above {e.limit:.3g} "
                f"(train.divergence_factor x the stage's starting level)"
            )
            raise fail(
                f"{stage.name}'s training loss {what} at step {e.step} of epoch {epoch + 1} (lr {lr:g}); {kept}; "
                "lower --lr or raise --batch-size, then --resume"
            ) from None
        except torch.OutOfMemoryError:
            per_process = cfg.batch_size // self.where.replicas
            raise LayerwiseError(
                f"out of memory on {self.device} in {stage.name}, epoch {epoch + 1}, at {per_process} images per "
                f"step; {kept}; lower --batch-size, or --set train.recompute_activations=true, train.precision=bf16 "
                "or train.cache=host, then --resume"
            ) from None
        if not math.isfinite(stats["loss"]):  # the same all-reduced loss on every process
            raise (LayerwiseError if self.where.is_main else QuietError)(
                f"training loss became {stats['loss']} in {stage.name}, epoch {epoch + 1} (lr {lr:g}); "
                f"checkpoints up to the previous epoch are kept in {self.dir.checkpoints}; "
                "start again with a lower --lr"
            )
        training.sync()
        stage = self.stages[stage.index]  # the whole stage (a pipeline process trains a part of it)
        with training.evaluated(finished=epoch + 1 == training.epochs):
            row = self.epoch_row(stage, epoch, lr, stats, memos, training)
        if "val" in row:
            self.val_top1[stage.index] = row["val"]["top1"]
        meta = {"stage": stage.index, "stage_name": stage.name, "block": stage.block, "epoch": epoch + 1, "lr": lr,
                "loss_level": training.loss_level}  # fmt: skip
        optimizer = training.optimizer
        if self.placement is not None:  # rank 0 gathers every process's blocks and optimizers, and saves them all
            meta["pipeline"] = self.placement.to_json()
            optimizer = GatheredState(gather_to_main(self.net, training.stage, training.optimizer, self.where))
        line = copy.deepcopy(row)  # on_epoch_end gets row while the worker writes this copy
        self.save(self.dir.last, meta, optimizer, first=lambda: self.dir.append_metrics(line))
        log.info(format_row(row))
        if self.board is not None:
            self.board.add(row)
        if self.on_epoch_end is not None:
            self.on_epoch_end(row)

    def save(self, path: Path, meta: dict, optimizer=None, first: Callable[[], None] | None = None) -> None:
        """Rank 0: snapshot the weights (and optimizer state) now; the writer runs `first`, if given, then saves
        them while training goes on."""
        if self.where.is_main:
            self.writer.submit(checkpoint_job(path, meta, self.net, optimizer, first, self.dir.path))

    def epoch_row(
        self, stage: Stage, epoch: int, lr: float, stats: dict, memos: dict, training: StageTraining | None = None
    ) -> dict[str, Any]:
        """One metrics line: the stage's last loss head's numbers and the ensemble over the stage's heads (the frozen
        heads' scores come from `memos` after the stage's first evaluation). A stage with several loss heads
        (decoupled) adds every block's figures under "blocks" (see docs/decisions.md for the schema)."""
        heads, ensemble, autocast = list(stage.eval_heads), self.cfg.train.ensemble, self.precision.autocast
        frozen = set(stage.frozen_heads) == set(heads[:-1])  # only then may evaluate() keep earlier heads' scores
        loaders = {"val": self.data.val, "train_eval": self.data.train_eval}  # None: not in this run
        scored = {}
        for key, loader in loaders.items():
            if loader is None:
                continue
            if self.placement is not None:
                scored[key] = evaluate_pipelined(self.net, loader, training.stage, self.pipe, self.where,
                                                 ensemble, autocast, self.cfg.train.eval_flip)  # fmt: skip
            else:
                memo = memos[key] if frozen else None
                flip = self.cfg.train.eval_flip
                scored[key] = evaluate(self.net, loader, heads, ensemble, autocast, memo, self.where, flip)

        def scores(j: int) -> dict[str, Any]:
            return {key: {**result["blocks"][j], "loss": result["losses"][j]} for key, result in scored.items()}

        row = {
            "stage": stage.index,
            "stage_name": stage.name,
            "block": stage.block,
            "epoch": epoch + 1,
            "lr": lr,
            "loss": stats["loss"],
            "train": {"top1": stats["top1"], "top5": stats["top5"]},
            **{k: v for k, v in scores(stage.block).items() if k == "val"},
            "images_per_s": stats["images_per_s"],
            "seconds": stats["seconds"],
            **{k: v for k, v in scores(stage.block).items() if k == "train_eval"},  # the lines' order of old
        }
        if "heads" in stats:
            row["blocks"] = [
                {"block": j, "lr": lr, "loss": figures["loss"],
                 "train": {"top1": figures["top1"], "top5": figures["top5"]}, **scores(j),
                 **{k: figures[k] for k in ("replays", "dropped") if k in figures}}
                for j, figures in stats["heads"].items()
            ]  # fmt: skip
        return row

    def cache_store(self, stage: Stage) -> str | Path:
        """Where stage's prefix cache lives: "device", "host", or its file (one per process under DDP)."""
        if self.cfg.train.cache != "disk":
            return self.cfg.train.cache
        name = f"prefix{stage.first}.rank{self.where.rank}.bin" if self.where.active else f"prefix{stage.first}.bin"
        return self.dir.path / "cache" / name

    def prefix_cache(self, stage: Stage) -> PrefixCache:
        t0 = time.perf_counter()
        seeds = [epoch_seed(self.cfg.train.seed, stage.index, v) for v in range(cache_views(self.cfg, stage))]
        store = self.cache_store(stage)
        cache = PrefixCache(self.net, stage.first, self.data.train, seeds, store, self.precision, self.dir.path)
        seconds = time.perf_counter() - t0
        log.info("%s: cached %d view(s) of the frozen prefix in %.1f s", stage.name, len(seeds), seconds)
        return cache

    def remove_stale_cache(self) -> None:
        """Rank 0: delete cache files an interrupted run left; they would count as used space."""
        if self.where.is_main:
            self.dir.remove_cache_files()

    def check_cache(self) -> None:
        """Size the largest prefix cache of the run and refuse it now if it cannot fit (every process of this node
        holds its own copy in host memory, and of the run on a disk cache)."""
        cfg, images = self.cfg.train, self.data.train
        cache_dir = self.dir.path / "cache"
        if not isinstance(images, MemoryLoader):
            raise LayerwiseError("train.cache needs in-memory data (data.augment=cifar); set train.cache=none")
        dtype = self.precision.dtype
        shapes = prefix_shapes(self.net, images.normalize(images.images[:1]))
        n, views = images.num_examples, cache_views(self.cfg)
        on_gpu = cfg.cache == "device" and self.device.type == "cuda"
        copies = 1 if on_gpu else self.where.world_size if cfg.cache == "disk" else self.where.local_world_size

        def weights(stage: Stage) -> int:  # a GPU cache must leave room for the weights the stage brings there
            return module_bytes(resident_modules(self.net, stage), off=self.device) if on_gpu else 0

        cached = [s for s in plan_stages(self.net.J, "greedy") if s.cacheable]
        stage = max(cached, key=lambda s: cache_bytes(n, views, shapes[s.first], dtype) + weights(s))
        needed = cache_bytes(n, views, shapes[stage.first], dtype)
        shape = "x".join(map(str, shapes[stage.first]))
        what = f"block {stage.first}'s input ({views} view(s) of {n} images at {shape}, {dtype})"
        what += f" in each of {copies} processes" if copies > 1 else ""
        if weights(stage):
            what += f" and the {human(weights(stage))} of weights that stage brings to the device"
        check_cache_fits(copies * needed + weights(stage), cfg.cache, self.device, cache_dir, what)
        log.info("prefix cache: at most %.2f GiB (%s)", copies * needed / 2**30, what)


class Board:
    """train.tensorboard: each epoch's metrics line as scalars in RUN/tensorboard (torch.utils.tensorboard), at
    step = the run's epoch count. Tags: loss/train, top1/train, lr, images_per_s; loss/S, top1/S and
    ensemble_top1/S for S = val and train_eval; a decoupled run adds top1/S/block j for each block."""

    @staticmethod
    def check() -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise LayerwiseError(
                "train.tensorboard needs the tensorboard package: pip install 'layerwise[tensorboard]'"
            ) from None

    def __init__(self, run: Path, epochs_done: int):
        from torch.utils.tensorboard import SummaryWriter

        with folder(run, "tensorboard", create=True):  # a real folder of the run, never a link out of it
            pass
        # events at steps >= epochs_done are of epochs a resumed run trains again: TensorBoard drops them
        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=epochs_done)
        self.step = epochs_done

    def add(self, row: dict[str, Any]) -> None:
        scalars = {"loss/train": row["loss"], "top1/train": row["train"]["top1"], "lr": row["lr"],
                   "images_per_s": row["images_per_s"]}  # fmt: skip
        for key in ("val", "train_eval"):
            if key in row:
                scalars.update({f"loss/{key}": row[key]["loss"], f"top1/{key}": row[key]["top1"],
                                f"ensemble_top1/{key}": row[key]["ensemble_top1"]})  # fmt: skip
            for block in row.get("blocks", []):
                if key in block:
                    scalars[f"top1/{key}/block {block['block']}"] = block[key]["top1"]
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, self.step)
        self.writer.flush()
        self.step += 1

    def close(self) -> None:
        self.writer.close()


def cache_views(cfg: RunConfig, stage: Stage | None = None) -> int:
    """Views beyond the stage's number of epochs (without a stage: the most of any greedy block's) would never be
    read."""
    train = cfg.train
    epochs = stage_epochs(train, stage) if stage is not None else max(train.block_epochs or [train.epochs_per_block])
    return min(train.cache_views, epochs)


def run_info(cfg: RunConfig, device: torch.device, data, description: str, where: Dist) -> dict[str, Any]:
    return {
        "layerwise": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "processes": where.world_size,
        "data": str(data) if data is not None else "built-in sample",
        "data_path": str(Path(data).resolve()) if data is not None else None,
        "data_description": description,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),  # torchrun's job; its restarts resume
    }


def elastic_restart_of(out: str | Path) -> bool:
    """Whether this process is one of torchrun's restarts (--max-restarts) of the job that started the run in
    `out`: its run.json names this job's TORCHELASTIC_RUN_ID. torchrun's default id without --standalone,
    "none", names no job in particular, so such a run resumes only when asked (--resume)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic_attempt() == 0 or run_id in (None, "", "none") or not RunDir(out).is_run():
        return False
    try:
        return RunDir(out).read_info().get("torchelastic_run_id") == run_id
    except LayerwiseError:  # an unreadable run.json: Run.open says so
        return False

"""Resuming a run: what may change when it resumes, where it continues from, and torchrun's restarts."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerwise.config import RunConfig, config_from_dict
from layerwise.distributed import elastic_attempt
from layerwise.errors import LayerwiseError
from layerwise.models.staged import StagedNet
from layerwise.rundir import RunDir, read_checkpoint
from layerwise.stages import Stage
from layerwise.train.checkpoint import save_checkpoint
from layerwise.train.schedule import stage_epochs

log = logging.getLogger("layerwise")

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


@dataclass(frozen=True)
class Resume:
    """Where training continues: a stage, the epochs of it already done, and what its epoch checkpoint holds."""

    stage: int = 0
    epoch: int = 0
    state: dict[str, Any] | None = None
    """The epoch checkpoint's optimizer state and train.ema's average (StageTraining.state)."""
    loss_level: float | None = None
    """The stage's starting loss level for the divergence check (train.divergence.LossWatch)."""


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


def resume_point(run: RunDir, net: StagedNet, stages: list[Stage], cfg: RunConfig, main: bool) -> Resume:
    """Load the newest checkpoint into the network; return where to continue from.

    final.pt (finished) > last.pt (end of an epoch) > the newest block{j}.pt (end of a greedy block).
    Rank 0 (`main`) drops the metric lines the checkpoint does not cover.
    """
    if run.final.is_file():
        net.load_state_dict(read_checkpoint(run.final).model)
        log.info("%s already finished; rewriting its summary", run.path)
        return Resume(len(stages))
    if run.last.is_file():
        meta, model_state, optimizer, average = read_checkpoint(run.last)
        net.load_state_dict(model_state)
        stage, epoch = stages[meta["stage"]], meta["epoch"]
        if main:
            run.keep_metrics(lambda r: (r["stage"], r["epoch"]) <= (stage.index, epoch))
        log.info("resuming %s after stage %d epoch %d", run.path, stage.index, epoch)
        if epoch < stage_epochs(cfg.train, stage):
            state = {"optimizer": optimizer, "average": average}
            return Resume(stage.index, epoch, state, meta.get("loss_level"))
        if main and stage.finishes_block and not run.block(stage.block).is_file():  # stopped before saving it
            meta = {"block": stage.block, "stage": stage.index}
            save_checkpoint(run.block(stage.block), meta, {"model": model_state}, root=run.path)
        return Resume(stage.index + 1)
    block = run.last_finished_block()
    if block is not None:  # last.pt was lost: continue after the last finished block
        meta, model_state, *_ = read_checkpoint(block)
        net.load_state_dict(model_state)
        if main:
            run.keep_metrics(lambda r: r["stage"] <= meta["stage"])
        log.info("resuming %s after %s (no last.pt)", run.path, block.name)
        return Resume(meta["stage"] + 1)
    if main:
        run.keep_metrics(lambda r: False)
    log.info("no checkpoint in %s yet: starting from the beginning", run.checkpoints)
    return Resume()


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

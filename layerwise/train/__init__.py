"""Training: strategies and their stages, the shared loop, checkpoints and whole runs."""

from layerwise.train.loop import StageTraining, train_epoch
from layerwise.train.run import Run, summary_table, train
from layerwise.train.stage import Stage, StageModule, plan_stages

__all__ = ["Run", "Stage", "StageModule", "StageTraining", "plan_stages", "summary_table", "train", "train_epoch"]

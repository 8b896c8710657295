"""Training: the shared loop, its strategies (greedy, end-to-end), checkpoints and whole runs."""

from layerwise.train.loop import Stage, plan_stages, train_epoch
from layerwise.train.run import summary_table, train

__all__ = ["Stage", "plan_stages", "summary_table", "train", "train_epoch"]

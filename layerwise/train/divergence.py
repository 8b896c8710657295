"""train.divergence_factor: a stage whose training loss runs away (or stops being finite) is stopped."""

from __future__ import annotations

import math
from typing import Protocol

import torch

from layerwise.distributed import ALONE

DIVERGENCE_WINDOW = 50
"""Steps in the running mean that train.divergence_factor checks, and how often the check is read."""


class Diverged(Exception):
    """The stage's training loss diverged at `step` of the epoch: non-finite, or a running mean of `mean`."""

    def __init__(self, step: int, mean: float, limit: float):
        super().__init__(f"running mean {mean:.4g} at step {step}, limit {limit:.4g}")
        self.step, self.mean, self.limit = step, mean, limit


class Summed(Protocol):
    """The processes whose step losses a check adds up (Replicas), counted as `count` copies of the batch's loss."""

    count: int

    def sum(self, t: torch.Tensor) -> torch.Tensor: ...


class LossWatch:
    """The epoch's last DIVERGENCE_WINDOW step losses on the device, with a flag for a non-finite one: no host
    sync per step. `check` reads them (one sync, and under DDP one all-reduce, so every process stops together).

    The stage's starting level is the mean of its first window (or of its first epoch, when shorter), and never
    below ln(classes), the loss of a uniform guess: early spikes raise the level instead of stopping the run.
    After that, a window whose mean exceeds factor x the level, or any non-finite loss, raises Diverged.
    """

    def __init__(self, factor: float, device: torch.device, over: Summed = ALONE, level: float | None = None):
        self.factor, self.over, self.level = factor, over, level
        self.window = torch.zeros(DIVERGENCE_WINDOW, dtype=torch.float64, device=device)
        self.bad = torch.zeros((), dtype=torch.float64, device=device)
        self.steps, self.classes, self.checked = 0, 0, 0

    def add(self, loss: torch.Tensor, classes: int) -> None:
        loss = loss.detach().double()
        self.window[self.steps % DIVERGENCE_WINDOW] = loss
        self.bad += (~torch.isfinite(loss)).double()
        self.steps, self.classes = self.steps + 1, classes

    def due(self, i: int, n: int) -> bool:
        return (i + 1) % DIVERGENCE_WINDOW == 0 or i + 1 == n

    def check_rest(self) -> None:
        """Check the steps since the last check, if any."""
        if self.steps > self.checked:
            self.check()

    def check(self) -> None:
        self.checked = self.steps
        kept = min(self.steps, DIVERGENCE_WINDOW)
        bad, mean = self.over.sum(torch.stack([self.bad, self.window[:kept].mean()])).tolist()
        mean /= self.over.count
        if bad > 0 or not math.isfinite(mean):
            raise Diverged(self.steps, math.nan, math.nan)
        if self.factor <= 0:
            return
        if self.level is None:  # the stage's first window: its starting level
            self.level = max(mean, math.log(max(self.classes, 2)))
        elif mean > self.factor * self.level:
            raise Diverged(self.steps, mean, self.factor * self.level)

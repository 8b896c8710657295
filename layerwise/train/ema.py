"""train.ema: an exponential moving average of what a stage trains, evaluated, checkpointed and left behind."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from layerwise.errors import LayerwiseError


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

"""A stage's optimizers: SGD as the paper's recipe has it (fused on a GPU), one per block when decoupled."""

from __future__ import annotations

import torch
from torch import nn

from layerwise.config import TrainConfig
from layerwise.errors import LayerwiseError


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


class Optimizers:
    """The stage's optimizers: one SGD over everything it trains, or (decoupled) one per trained block, over the
    block and its head, as DGL's code has, so that a process holding some of the blocks holds their optimizers.
    Every block follows the same step schedule (lr_at). The state_dict of one is the SGD's own (checkpoints of
    greedy and end-to-end runs are unchanged); of several, {"blocks": {"j": SGD state}}."""

    def __init__(self, groups: dict[int, list[nn.Parameter]] | list[nn.Parameter], cfg: TrainConfig):
        self.per_block = isinstance(groups, dict)
        parts = groups if self.per_block else {-1: groups}
        self.optimizers = {j: make_optimizer(params, cfg) for j, params in parts.items()}

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
            return self.optimizers[-1].state_dict()
        return {"blocks": {str(j): optimizer.state_dict() for j, optimizer in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not self.per_block:
            load_optimizer_state(self.optimizers[-1], state)
            return
        saved = state.get("blocks") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or not {str(j) for j in self.optimizers} <= saved.keys():
            raise LayerwiseError("the checkpoint's optimizer state does not cover this stage's blocks; start anew")
        for j, optimizer in self.optimizers.items():
            load_optimizer_state(optimizer, saved[str(j)])

"""Strategies and their stages: what each stage trains, freezes, scores and may cache, and where its modules sit.

A strategy is a list of stages. A stage trains blocks[first..block] and the heads in `loss_heads` on the output
of the frozen blocks before `first`:
- greedy (Algorithm 1): stage j trains block j and head j alone, first = block = j;
- end-to-end: one stage trains every block and the last head, first = 0, block = J-1;
- decoupled (DGL, Belilovsky et al. 2020): one stage trains every block at once, each from its own head on the
  detached output of the block before it, first = 0, block = J-1, every head a loss head.
Everything else (the loop, checkpoints, resume, caching, DDP, and serving's choice of the heads a run delivers)
reads the stage's fields, never the mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layerwise.models.staged import StagedNet


@dataclass(frozen=True, kw_only=True)
class Stage:
    index: int
    """Position in the strategy's list; checkpoints and metrics name stages by it."""
    name: str
    first: int
    """The first trained block; blocks before it are frozen (eval mode, no gradient)."""
    block: int
    """The last trained block; its head gives the loss."""
    eval_heads: tuple[int, ...]
    """Heads scored after each epoch; the ensemble runs over them."""
    frozen_heads: tuple[int, ...]
    """Scored heads that this stage never changes: their scores on fixed data can be computed once and reused."""
    cacheable: bool
    """Whether the frozen prefix's output can be cached (train.cache): there is a prefix, and it never changes."""
    finishes_block: bool
    """Whether the stage leaves block `block` finished for good, saved as checkpoints/block{j}.pt."""
    decoupled: bool = False
    """Every trained block learns from its own head only: block j's input is block j-1's output, detached, so no
    gradient crosses a block boundary. Otherwise the gradient flows from head `block` through every trained block."""
    receives: bool = False
    """The stage's batches are block `first`'s input, received from the pipeline process before it
    (train/pipeline/): it runs and holds no earlier block."""

    @property
    def loss_heads(self) -> tuple[int, ...]:
        """The heads whose losses train the stage: every trained block's when decoupled, else head `block`'s."""
        return tuple(self.trained_blocks) if self.decoupled else (self.block,)

    @property
    def frozen_blocks(self) -> range:
        return range(self.first)

    @property
    def trained_blocks(self) -> range:
        return range(self.first, self.block + 1)


def greedy(J: int) -> list[Stage]:
    """Algorithm 1: block j and its head, on the frozen blocks before it; heads 0..j are scored."""
    return [
        Stage(
            index=j,
            name=f"block {j}",
            first=j,
            block=j,
            eval_heads=tuple(range(j + 1)),
            frozen_heads=tuple(range(j)),
            cacheable=j > 0,
            finishes_block=True,
        )
        for j in range(J)
    ]


def end_to_end(J: int) -> list[Stage]:
    """The reference: every block and the last head, jointly; only the last head is scored."""
    return [
        Stage(
            index=0,
            name="e2e",
            first=0,
            block=J - 1,
            eval_heads=(J - 1,),
            frozen_heads=(),
            cacheable=False,
            finishes_block=False,
        )
    ]


def decoupled(J: int) -> list[Stage]:
    """DGL: every block and every head at once, each block on the detached output of the one before; every head
    is scored (none is frozen) and the ensemble runs over all of them."""
    heads = tuple(range(J))
    return [
        Stage(
            index=0,
            name="decoupled",
            first=0,
            block=J - 1,
            eval_heads=heads,
            frozen_heads=(),
            cacheable=False,
            finishes_block=False,
            decoupled=True,
        )
    ]


STRATEGIES = {"greedy": greedy, "e2e": end_to_end, "decoupled": decoupled}


def plan_stages(J: int, mode: str) -> list[Stage]:
    if mode not in STRATEGIES:
        raise ValueError(f"unknown mode {mode!r}")
    return STRATEGIES[mode](J)


def resident_modules(net: StagedNet, stage: Stage) -> nn.ModuleList:
    """What the stage runs: blocks 0..stage.block (first..block when it receives its input) and the heads it
    trains or scores."""
    heads = sorted({*stage.eval_heads, *stage.loss_heads})
    start = stage.first if stage.receives else 0
    return nn.ModuleList([*net.blocks[start : stage.block + 1], *(net.heads[j] for j in heads)])


def place_for(net: StagedNet, stage: Stage, device: torch.device) -> None:
    """Put the stage's resident modules on `device` and keep every other block and head on the CPU.

    Later blocks and heads (VGG-11's 0.5 GiB classifier during greedy block 0) and, end to end, the unused
    auxiliary heads then take no device memory. Moves keep each tensor's memory format.
    """
    resident = {id(m) for m in resident_modules(net, stage)}
    for module in (*net.blocks, *net.heads):
        module.to(device if id(module) in resident else torch.device("cpu"))


def module_bytes(module: nn.Module, off: torch.device | None = None) -> int:
    """Bytes of the module's parameters and buffers; with `off`, only of those not on that kind of device yet."""
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()) if off is None or t.device.type != off.type)

"""The trained part of a stage (StageModule: its blocks and loss heads, each with its local loss), freezing
the rest, and the frozen prefix's output. layerwise.stages says what each stage of a strategy trains.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from layerwise.losses import PLAIN, LocalLoss, Seen
from layerwise.models.blocks import has_conv_units, recomputed
from layerwise.models.pooled import chunkable, pooled_block_and_head
from layerwise.models.staged import StagedNet, classifies
from layerwise.stages import Stage


class StageModule(nn.Module):
    """What a stage trains, as one module that DDP can wrap: x_first -> blocks first..block -> the loss heads.

    forward(x, y) -> (loss, logits), where x is the input of block `first` (the frozen prefix's output, or a cached
    copy of it). With one loss head (greedy, end to end) the loss is its local loss and the logits are (B,
    classes); with several (decoupled) the loss is (H,), one local loss per loss head, and the logits are
    (S, B, classes), those of the S heads that classify (`scored`; a head whose output is not class scores,
    InfoPro's contrastive projection, has a loss and no logits). A decoupled stage detaches each block's input,
    so head j's loss reaches block j alone, and
    runs each block and its head under its own random stream (`randomness`, set per epoch by the run). It holds
    the network's own modules, not copies.
    """

    def __init__(
        self,
        net: StagedNet,
        stage: Stage,
        losses: list[LocalLoss] | None = None,
        block_chunks: int = 0,
        keep_output: bool = False,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(net.blocks[j] for j in stage.trained_blocks)
        self.heads = nn.ModuleList(net.heads[j] for j in stage.loss_heads)
        self.first, self.decoupled = stage.first, stage.decoupled
        # train.recompute_activations: the library's blocks and heads recompute conv unit by conv unit; any
        # other module (your own) is recomputed whole
        self.whole = {id(m): net.recompute and not has_conv_units(m) for m in (*self.blocks, *self.heads)}
        self.losses = [PLAIN if losses is None else losses[j] for j in stage.loss_heads]
        """Each loss head's local loss (layerwise/losses.py; `losses` has one per head of the network)."""
        self.scored = [classifies(head) for head in self.heads]
        """Which loss heads give class scores, whose logits forward returns."""
        self.block_chunks = block_chunks
        """train.block_chunks: a block that feeds only its head's half pooling runs in this many chunks."""
        # the block feeds only its head's half pooling (VGG heads): models/pooled.py
        self.poolable = len(self.blocks) == 1 and chunkable(self.blocks[0], self.heads[-1])
        self.randomness: BlockRandomness | None = None
        self.output: torch.Tensor | None = None
        self.keep_output = keep_output
        """Keep the last block's output after each forward pass (`output`), for whoever reads it after the step."""

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        grad = self.training and torch.is_grad_enabled()
        return recomputed(module, x) if self.whole[id(module)] and grad else module(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = x if self.first == 0 else None  # what a reconstruction loss compares with
        if not self.decoupled:
            if self.block_chunks and self.poolable and self.training and torch.is_grad_enabled():
                logits = pooled_block_and_head(self.blocks[0], self.heads[-1], x, self.block_chunks)
                if logits is not None:  # the block's output only ever existed a chunk at a time
                    return self.losses[-1](Seen(logits, y)), logits
            for block in self.blocks:
                x = self.run(block, x)
            z = self.run(self.heads[-1], x)
            return self.losses[-1](Seen(z, y, x, self.heads[-1], image)), z
        losses, logits = [], []
        for j, (block, head, loss) in enumerate(zip(self.blocks, self.heads, self.losses, strict=True), self.first):
            with self.randomness.block(j) if self.randomness is not None else nullcontext():
                x = self.run(block, x.detach())  # block j learns from head j alone
                z = self.run(head, x)
                losses.append(loss(Seen(z, y, x, head, image)))
            if self.scored[j - self.first]:
                logits.append(z)
        if self.keep_output:
            self.output = x.detach()
        return torch.stack(losses), torch.stack(logits)

    def take_output(self) -> torch.Tensor | None:
        """The last block's output of the last forward pass (keep_output), no longer kept here."""
        output, self.output = self.output, None
        return output

    def start_epoch(self, seed: int, device: torch.device) -> None:
        """A decoupled stage's blocks draw from random streams of their own this epoch, seeded from `seed`."""
        self.randomness = BlockRandomness(seed, device)


class BlockRandomness:
    """One random stream per block (dropout masks in its block and head), seeded by (epoch, block, replica): the
    masks a block draws do not depend on which blocks share its process, so a pipeline that puts each block in a
    process of its own draws the ones a single process does. `block(j)` swaps block j's stream in around its
    forward pass and the process's own stream back afterwards."""

    def __init__(self, seed: int, device: torch.device):
        self.seed, self.device = seed, device
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    @contextmanager
    def block(self, j: int) -> Iterator[None]:
        outer = self._get()
        if j in self.states:
            self._set(self.states[j])
        else:  # the block's first draw of the epoch
            torch.manual_seed((self.seed + 104_729 * (j + 1)) % 2**63)
        try:
            yield
        finally:
            self.states[j] = self._get()
            self._set(outer)


def network_key(stage: Stage, key: str) -> str:
    """A StageModule state_dict key as the network's state_dict names the same tensor: its blocks.i is block
    first + i, its heads.h the stage's h-th loss head (as a SyncBatchNorm conversion keeps them)."""
    kind, index, rest = key.split(".", 2)
    j = stage.trained_blocks[int(index)] if kind == "blocks" else stage.loss_heads[int(index)]
    return f"{kind}.{j}.{rest}"


@torch.no_grad()
def frozen_prefix(net: StagedNet, stage: Stage, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """x_first from x, the input of block `offset` (0: the image; `first`: a cached x_first, returned as is)."""
    for j in range(offset, stage.first):
        x = net.blocks[j](x)
    return x


def freeze_for(
    net: StagedNet, stage: Stage, losses: list[LocalLoss] | None = None, block_chunks: int = 0, keep_output=False
) -> StageModule:
    """Put everything but the stage's modules in eval mode without gradients; return the trained part (a
    StageModule with the other arguments).

    Frozen blocks therefore use their BN running statistics and receive no updates (Algorithm 1).
    """
    net.eval().requires_grad_(False)
    for p in net.parameters():
        p.grad = None  # frees gradients left over from an earlier stage
    trained = StageModule(net, stage, losses, block_chunks, keep_output)
    trained.train().requires_grad_(True)
    return trained

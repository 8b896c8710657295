"""Strategies and their stages: what each stage trains, freezes, scores and may cache.

A strategy is a list of stages. A stage trains blocks[first..block] and the heads in `loss_heads` on the output
of the frozen blocks before `first`:
- greedy (Algorithm 1): stage j trains block j and head j alone, first = block = j;
- end-to-end: one stage trains every block and the last head, first = 0, block = J-1;
- decoupled (DGL, Belilovsky et al. 2020): one stage trains every block at once, each from its own head on the
  detached output of the block before it, first = 0, block = J-1, every head a loss head.
Everything else (the loop, checkpoints, resume, caching, DDP) reads the stage's fields, never the mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.models.blocks import has_conv_units, recomputed
from layerwise.models.pooled import chunkable, pooled_unit
from layerwise.models.staged import StagedNet


@dataclass(frozen=True)
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
    (train/pipeline.py): it runs and holds no earlier block."""

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
    return [Stage(j, f"block {j}", j, j, tuple(range(j + 1)), tuple(range(j)), j > 0, True) for j in range(J)]


def end_to_end(J: int) -> list[Stage]:
    """The reference: every block and the last head, jointly; only the last head is scored."""
    return [Stage(0, "e2e", 0, J - 1, (J - 1,), (), False, False)]


def decoupled(J: int) -> list[Stage]:
    """DGL: every block and every head at once, each block on the detached output of the one before; every head
    is scored (none is frozen) and the ensemble runs over all of them."""
    heads = tuple(range(J))
    return [Stage(0, "decoupled", 0, J - 1, heads, (), False, False, decoupled=True)]


STRATEGIES = {"greedy": greedy, "e2e": end_to_end, "decoupled": decoupled}


def plan_stages(J: int, mode: str) -> list[Stage]:
    if mode not in STRATEGIES:
        raise ValueError(f"unknown mode {mode!r}")
    return STRATEGIES[mode](J)


class StageModule(nn.Module):
    """What a stage trains, as one module that DDP can wrap: x_first -> blocks first..block -> the loss heads.

    forward(x, y) -> (loss, logits), where x is the input of block `first` (the frozen prefix's output, or a cached
    copy of it). With one loss head (greedy, end to end) the loss is its cross-entropy and the logits are (B,
    classes); with several (decoupled) the loss is (H,), one cross-entropy per loss head, and the logits are
    (H, B, classes). A decoupled stage detaches each block's input, so head j's loss reaches block j alone, and
    runs each block and its head under its own random stream (`randomness`, set per epoch by the run). It holds
    the network's own modules, not copies.
    """

    def __init__(self, net: StagedNet, stage: Stage):
        super().__init__()
        self.blocks = nn.ModuleList(net.blocks[j] for j in stage.trained_blocks)
        self.heads = nn.ModuleList(net.heads[j] for j in stage.loss_heads)
        self.first, self.decoupled = stage.first, stage.decoupled
        # train.recompute_activations: the library's blocks and heads recompute conv unit by conv unit; any
        # other module (your own) is recomputed whole
        self.whole = {id(m): net.recompute and not has_conv_units(m) for m in (*self.blocks, *self.heads)}
        self.label_smoothing = 0.0  # train.label_smoothing, set by StageTraining
        self.sim_loss = 0.0  # train.sim_loss, set by StageTraining
        self.block_chunks = 0  # train.block_chunks, set by StageTraining
        # the block feeds only its head's half pooling (VGG heads): models/pooled.py
        self.poolable = len(self.blocks) == 1 and chunkable(self.blocks[0], self.heads[-1])
        self.randomness: BlockRandomness | None = None
        self.output: torch.Tensor | None = None
        self.keep_output = False  # set by StageTraining for a pipeline process with a next one

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        grad = self.training and torch.is_grad_enabled()
        return recomputed(module, x) if self.whole[id(module)] and grad else module(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.decoupled:
            pooled = None
            if self.block_chunks and self.poolable and self.training and torch.is_grad_enabled():
                pooled = pooled_unit(self.blocks[0], x, self.block_chunks)
            if pooled is not None:  # the block's output only ever existed a chunk at a time
                for layer in list(self.heads[-1])[1:]:  # the head after its half pooling
                    pooled = layer(pooled)
                return self.cross_entropy(pooled, y), pooled
            for block in self.blocks:
                x = self.run(block, x)
            logits = self.run(self.heads[-1], x)
            return self.loss(logits, y, x), logits
        losses, logits = [], []
        for j, (block, head) in enumerate(zip(self.blocks, self.heads, strict=True), start=self.first):
            with self.randomness.block(j) if self.randomness is not None else nullcontext():
                x = self.run(block, x.detach())  # block j learns from head j alone
                z = self.run(head, x)
            losses.append(self.loss(z, y, x))
            logits.append(z)
        if self.keep_output:  # what a pipeline process sends on (train/pipeline.py)
            self.output = x.detach()
        return torch.stack(losses), torch.stack(logits)

    def cross_entropy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y: labels, or (data.mix) class probabilities."""
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """A loss head's loss: its cross-entropy, plus train.sim_loss x the similarity-matching loss of the block
        output `features` it read (in float32 under autocast too: its matrix product would run in bf16)."""
        loss = self.cross_entropy(logits, y)
        if not self.sim_loss:
            return loss
        targets = y.float() if y.dim() == 2 else F.one_hot(y, logits.shape[-1]).float()
        with torch.autocast(features.device.type, enabled=False):
            return loss + self.sim_loss * similarity_loss(features.float(), targets)


def similarities(x: torch.Tensor) -> torch.Tensor:
    """(B, B) cosine similarities of the batch's rows, each row centred over its entries first (Nokland & Eidnes
    2019); feature maps (B, C, H, W) with more than one position become each channel's standard deviation over
    the positions, as in their code."""
    x = x.float()
    if x.dim() == 4 and x.shape[2] * x.shape[3] > 1:
        x = x.flatten(2).std(dim=2)
    x = x.flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
    return (x @ x.T).clamp(-1, 1)


def similarity_loss(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The similarity-matching loss: the mean squared difference between the similarities of the features and of
    the targets (one-hot labels or class probabilities)."""
    return F.mse_loss(similarities(features), similarities(targets))


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


def freeze_for(net: StagedNet, stage: Stage) -> StageModule:
    """Put everything but the stage's modules in eval mode without gradients; return the trained part.

    Frozen blocks therefore use their BN running statistics and receive no updates (Algorithm 1).
    """
    net.eval().requires_grad_(False)
    for p in net.parameters():
        p.grad = None  # frees gradients left over from an earlier stage
    trained = StageModule(net, stage)
    trained.train().requires_grad_(True)
    return trained

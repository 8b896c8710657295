"""One training loop for every strategy. A strategy is only a list of stages.

A stage trains blocks[first..block] and heads[block] on the output of the frozen blocks before `first`:
- greedy (Algorithm 1): stage j trains block j and head j alone, first = block = j;
- end-to-end: one stage trains every block and the last head, first = 0, block = J-1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from layerwise.config import TrainConfig
from layerwise.data.loaders import Loader
from layerwise.evaluate import topk_correct
from layerwise.models.staged import StagedNet


@dataclass(frozen=True)
class Stage:
    name: str
    block: int
    """The last trained block; its head gives the loss."""
    first: int
    """The first trained block; blocks before it are frozen (eval mode, no gradient)."""
    eval_blocks: tuple[int, ...]
    """Heads scored after each epoch; the ensemble runs over them."""


def plan_stages(J: int, mode: str) -> list[Stage]:
    if mode == "greedy":
        return [Stage(f"block {j}", j, j, tuple(range(j + 1))) for j in range(J)]
    if mode == "e2e":
        return [Stage("e2e", J - 1, 0, (J - 1,))]
    raise ValueError(f"unknown mode {mode!r}")


def trainable_modules(net: StagedNet, stage: Stage) -> nn.ModuleList:
    return nn.ModuleList([*net.blocks[stage.first : stage.block + 1], net.heads[stage.block]])


def resident_modules(net: StagedNet, stage: Stage) -> nn.ModuleList:
    """What the stage runs: blocks 0..stage.block and the heads it trains or scores."""
    heads = sorted({*stage.eval_blocks, stage.block})
    return nn.ModuleList([*net.blocks[: stage.block + 1], *(net.heads[j] for j in heads)])


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


def freeze_for(net: StagedNet, stage: Stage) -> nn.ModuleList:
    """Put everything but the stage's modules in eval mode without gradients; return the trainable part.

    Frozen blocks therefore use their BN running statistics and receive no updates (Algorithm 1).
    """
    net.eval().requires_grad_(False)
    for p in net.parameters():
        p.grad = None  # frees gradients left over from an earlier stage
    trainable = trainable_modules(net, stage)
    trainable.train().requires_grad_(True)
    return trainable


def make_optimizer(params, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.SGD:
    """SGD with momentum and weight decay. `fused` (default: on a GPU, when this torch has it) does the whole
    update in one kernel. The CPU keeps the for-loop update by default: fused rounds differently, which moved
    the demo's last block from 65.1 to 64.2 % (2026-11-26), and the documented CPU results must stay
    reproducible."""
    params = list(params)
    options = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
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


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Step schedule within a stage: lr x gamma^(epoch // lr_step)."""
    return cfg.lr * cfg.lr_gamma ** (epoch // cfg.lr_step)


def start_epoch(optimizer: torch.optim.Optimizer, cfg: TrainConfig, epoch: int) -> float:
    """Set this epoch's learning rate; at a decay, optionally forget momentum as the released code does."""
    lr = lr_at(cfg, epoch)
    if cfg.reset_momentum_at_decay and epoch > 0 and epoch % cfg.lr_step == 0:
        optimizer.state.clear()
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def stage_logits(net: StagedNet, stage: Stage, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The stage's head's logits for x, the input of block `offset`. Blocks before stage.first run without
    gradients. One loop, so the caller holds no block's output: the frozen prefix's output lives only as long
    as the first trained block keeps it for its backward pass (after a P or a pool, it does not)."""
    for j in range(offset, stage.block + 1):
        with torch.no_grad() if j < stage.first else nullcontext():
            x = net.blocks[j](x)
    return net.heads[stage.block](x)


def stage_loss(
    net: StagedNet, stage: Stage, x: torch.Tensor, y: torch.Tensor, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of the stage's head, its logits) for a batch; what `train.compile` compiles."""
    logits = stage_logits(net, stage, x, offset)
    return F.cross_entropy(logits.float(), y), logits


LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def compiled_loss(mode: str) -> LossFn:
    """stage_loss, compiled with torch.compile in this mode (`none`: as it is).

    Call it once per stage: it clears the compile caches, since each stage freezes other modules and
    recompiles anyway, and stale entries would count towards torch's recompilation limit.
    """
    if mode == "none":
        return stage_loss
    torch.compiler.reset()
    return torch.compile(stage_loss, mode=mode)


def train_step(
    net: StagedNet,
    stage: Stage,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    offset: int = 0,
    autocast=None,
    loss_fn: LossFn = stage_loss,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step of the stage. x is the input of block `offset`: the image when 0, else a
    cached output of the frozen prefix. Returns (loss, logits), both still on the device."""
    # Free the last step's gradients before the forward pass, so they never coexist with its activations.
    optimizer.zero_grad(set_to_none=True)
    with autocast() if autocast else nullcontext():
        loss, logits = loss_fn(net, stage, x, y, offset)
    loss.backward()
    optimizer.step()
    return loss, logits


def train_epoch(
    net: StagedNet,
    stage: Stage,
    loader: Loader,
    optimizer: torch.optim.Optimizer,
    seed: int,
    autocast=None,
    desc: str = "",
    epoch: int = 0,
    loss_fn: LossFn = stage_loss,
) -> dict:
    """One pass over the training data. Sums stay on the device; the only host sync is at the end.

    `loader` yields images, or (a PrefixCache) the frozen blocks' output for this epoch's cached view.
    """
    freeze_for(net, stage)
    offset = loader.offset
    sums = torch.zeros(3, dtype=torch.float64, device=loader.device)  # loss * n, top-1 hits, top-5 hits
    n = 0
    t0 = time.perf_counter()
    for x, y in tqdm(
        loader.batches(seed, epoch), total=len(loader), desc=desc, leave=False, disable=None, unit="batch"
    ):
        loss, logits = train_step(net, stage, x, y, optimizer, offset, autocast, loss_fn)
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * len(y), *topk_correct(logits.detach().float(), y)])
        n += len(y)
    loss_sum, top1, top5 = sums.tolist()
    seconds = time.perf_counter() - t0
    return {
        "loss": loss_sum / n,
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "images_per_s": n / seconds,
        "seconds": seconds,
    }

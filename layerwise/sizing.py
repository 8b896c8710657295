"""Sizing a network before it is built: a config (perhaps received with a run directory) may describe any size.

The network is built on the meta device first, where tensors have shapes and no storage, so its parameters can
be counted and one batch's activations measured without allocating either.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from layerwise.config import RunConfig
from layerwise.errors import LayerwiseError
from layerwise.limits import human_bytes
from layerwise.models import build_model
from layerwise.models.pooled import chunkable
from layerwise.models.staged import count


def machine_memory() -> int:
    """Bytes of memory this process may use: the physical memory, or a smaller cgroup (container) limit."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return machine_memory()


def trained_activations(
    net: nn.Module, stages, batch: int, in_channels: int, size: int, element: int, chunks: int = 0
) -> list[int]:
    """For each stage, the bytes of the outputs of every leaf module it trains, for one batch: the least its
    backward pass must keep (a lower bound: autograd may keep more). A block run in `chunks` (train.block_chunks)
    counts one chunk's outputs."""
    sizes = {}
    hooks = [
        m.register_forward_hook(lambda m, i, out: sizes.__setitem__(m, out.numel() * element))
        for m in net.modules()
        if not list(m.children())
    ]
    try:
        with torch.no_grad():
            x = torch.empty(batch, in_channels, size, size, device="meta")
            for j, block in enumerate(net.blocks):
                x = block(x)
                net.heads[j](x)
    finally:
        for h in hooks:
            h.remove()
    per_stage = []
    for stage in stages:
        blocks = [net.blocks[j] for j in stage.trained_blocks]
        heads = [net.heads[j] for j in stage.loss_heads]
        chunked = chunks and len(blocks) == 1 and chunkable(blocks[0], heads[-1])
        block_bytes = sum(sizes.get(m, 0) for part in blocks for m in part.modules())
        per_stage.append(
            block_bytes // (chunks if chunked else 1) + sum(sizes.get(m, 0) for h in heads for m in h.modules())
        )
    return per_stage


def check_size(
    cfg: RunConfig, num_classes: int, device: torch.device, batch: int | None = None, mode: str | None = None
) -> None:
    """Refuse, in one line, a network whose fp32 weights exceed this machine's memory, or (with `batch`, the
    images per step of this process) whose activations for a training step exceed the device's."""
    from layerwise.stages import plan_stages

    try:
        with torch.device("meta"):
            net = build_model(cfg.model, num_classes, cfg.data.image_size)
    except (RuntimeError, ValueError) as e:
        raise LayerwiseError(
            f"the model cannot be built ({str(e).splitlines()[0][:200]}); check model.widths and model.downsample_at"
        ) from None
    weights, host = 4 * count(net), machine_memory()
    if weights > host:
        raise LayerwiseError(
            f"the network the config describes has {count(net):,} parameters ({human_bytes(weights)} of fp32 "
            f"weights), more than this machine's {human_bytes(host)} of memory; check model.widths and model.k"
        )
    if batch is None:
        return
    element = 2 if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda") else 4
    stages = plan_stages(net.J, mode or cfg.train.mode)  # a pipeline process is sized as a greedy stage
    try:
        needs = trained_activations(net, stages, batch, cfg.model.in_channels, cfg.data.image_size, element,
                                    cfg.train.block_chunks)  # fmt: skip
    except (RuntimeError, ValueError):
        return  # a shape problem: checked_model's real forward pass names it
    largest = max(range(len(stages)), key=needs.__getitem__)
    available = device_memory(device)
    if needs[largest] > available:
        raise LayerwiseError(
            f"{stages[largest].name} needs at least {human_bytes(needs[largest])} of activations for a step of "
            f"{batch} images, more than the {human_bytes(available)} of {device}; lower --batch-size or "
            "data.image_size, or --set train.recompute_activations=true"
        )

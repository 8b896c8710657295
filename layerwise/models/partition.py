"""Costs and cuts: the one FLOP counter and the one balanced partition of a chain of units into groups.

A split network's modules (resnet.py), a pipeline's process groups (train/pipeline/placement.py) and the early-exit
compute figures (early_exit.py) all come from here.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from layerwise.config import ModelConfig
from layerwise.models.registry import build_model


def unit_flops(units: Sequence[nn.Module], shape: tuple[int, ...]) -> tuple[list[float], list[tuple[int, ...]]]:
    """Each unit's forward FLOPs (2 per multiply-add) for one image of `shape` (C, H, W), the units chained, and
    each unit's output shape (batch of 1), counted by torch.utils.flop_counter on the meta device in eval mode
    (one image: BN's batch statistics would need two). Nothing is allocated and the units are not changed."""
    from torch.utils.flop_counter import FlopCounterMode

    costs, shapes = [], []
    with torch.device("meta"):
        x = torch.empty(1, *shape)  # (1, C, H, W)
        for unit in units:
            probe = _on_meta(unit)
            was = probe.training
            with FlopCounterMode(display=False) as counter:
                x = probe.eval()(x)
            probe.train(was)
            costs.append(float(counter.get_total_flops()))
            shapes.append(tuple(x.shape))
    return costs, shapes


def flops_per_image(cfg: ModelConfig, num_classes: int, size: int) -> tuple[list[float], list[float]]:
    """Forward FLOPs of each block and each head of cfg's network for one size x size image."""
    with torch.device("meta"):
        net = build_model(cfg, num_classes, size)
    blocks, shapes = unit_flops(net.blocks, (cfg.in_channels, size, size))
    heads = [unit_flops([head], shape[1:])[0][0] for head, shape in zip(net.heads, shapes, strict=True)]
    return blocks, heads


def balanced_cut(costs: Sequence[float], groups: int, first: int = 1) -> list[int]:
    """Cut units with `costs`, in order, into `groups` contiguous groups whose costliest group costs the least,
    the first holding at least `first` units (a stem joins the first block); returns each group's end (exclusive).

    Dynamic programming over the cut points; among equal maxima the earliest cuts win."""
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(groups + 1)]  # best[g][i]: the least maximum of units [0, i) in g groups
    cut = [[0] * (n + 1) for _ in range(groups + 1)]  # cut[g][i]: where its last group starts
    for i in range(first, n + 1):
        best[1][i] = prefix[i]
    for g in range(2, groups + 1):
        for i in range(g, n + 1):
            for j in range(max(g - 1, first), i):
                cost = max(best[g - 1][j], prefix[i] - prefix[j])
                if cost < best[g][i]:
                    best[g][i], cut[g][i] = cost, j
    ends, i = [], n
    for g in range(groups, 1, -1):
        ends.append(i)
        i = cut[g][i]
    return [i, *reversed(ends)]


def _on_meta(module: nn.Module) -> nn.Module:
    on_meta = all(t.device.type == "meta" for t in (*module.parameters(), *module.buffers()))
    return module if on_meta else copy.deepcopy(module).to("meta")

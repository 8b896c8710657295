"""PredSim (Nokland & Eidnes 2019, `anokland/local-loss`): each module's head predicts the class from its block
output pooled to at most 4096 features (a zero-initialised linear layer), and matches the similarities of its own
3x3 conv's output to those of the labels; model.head=predsim, model.head_beta."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.losses import CrossEntropy, LocalLoss, Seen, one_hot, register_losses, similarity_loss
from layerwise.models.heads import HeadSpec, register_head


def predsim_pool(channels: int, side: int, limit: int = 4096) -> tuple[tuple[int, int], tuple[int, int], int]:
    """PredSim's pooling before its linear layer for a (channels, side, side) map: average-pooling kernels that
    double, height first and then width, while the flattened size is above `limit` and the height kernel is below
    the side; the padding that makes each output side ceil(side / kernel). Returns (kernel, padding, features)."""
    kh = kw = 1
    h = w = side
    while channels * h * w > limit and kh < side:
        kh *= 2
        h = math.ceil(side / kh)
        if channels * h * w > limit:
            kw *= 2
            w = math.ceil(side / kw)
    padding = ((kh * (h - side // kh)) // 2, (kw * (w - side // kw)) // 2)
    return (kh, kw), padding, channels * h * w


class PredSimHead(nn.Module):
    """One module's PredSim pieces. forward, the pred path: (B, C, side, side) -> average pooling to at most 4096
    features (predsim_pool; padded zeros count) -> linear with zero weights -> (B, classes). `sim`, which only the
    loss reads: its own 3x3 conv (C -> C, no bias, no BN), (B, C, side, side); None in the last module's head,
    trained by cross-entropy alone."""

    def __init__(self, in_channels: int, side: int, num_classes: int, sim: bool = True):
        super().__init__()
        kernel, padding, flat = predsim_pool(in_channels, side)
        self.pool = nn.AvgPool2d(kernel, padding=padding) if kernel != (1, 1) else nn.Identity()
        self.pred = nn.Linear(flat, num_classes)
        nn.init.zeros_(self.pred.weight)  # the bias keeps nn.Linear's own initialisation, as their code
        self.sim = nn.Conv2d(in_channels, in_channels, 3, 1, 1, bias=False) if sim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pred(self.pool(x).flatten(1))  # (B, C, h, w) -> (B, C*h*w) -> (B, classes)


@register_head("predsim")
def predsim_head(spec: HeadSpec) -> PredSimHead:
    if spec.side < 1:
        raise LayerwiseError("model.head=predsim needs each module's square output size; this network gives none")
    return PredSimHead(spec.channels, spec.side, spec.num_classes, sim=not spec.last)


@dataclass(frozen=True)
class PredSimLoss:
    """(1 - beta) x the cross-entropy of the pred scores + beta x the similarity-matching loss of the head's sim
    conv output against the targets (layerwise.losses.similarity_loss, in float32)."""

    beta: float
    label_smoothing: float = 0.0

    def __call__(self, seen: Seen) -> torch.Tensor:
        pred = CrossEntropy(self.label_smoothing)(seen)
        sim = seen.head.sim(seen.features)  # (B, C, H, W)
        with torch.autocast(sim.device.type, enabled=False):
            matched = similarity_loss(sim.float(), one_hot(seen.targets, seen.output.shape[-1]))
        return (1 - self.beta) * pred + self.beta * matched


@register_losses("predsim")
def predsim_losses(cfg, heads: int) -> list[LocalLoss]:
    """PredSim for every module but the last, whose head (the delivered classifier) learns by cross-entropy."""
    smoothing = cfg.train.label_smoothing
    return [PredSimLoss(cfg.model.head_beta, smoothing)] * (heads - 1) + [CrossEntropy(smoothing)]

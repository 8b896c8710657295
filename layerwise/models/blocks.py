"""Block j of the staged network: x_{j+1} = ReLU(BN(conv3x3(P x_j))), and the conv units it shares with the heads."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from layerwise.models.downsample import SpaceToDepth


class ConvUnit(nn.Sequential):
    """Parameter-free layers (P, a pool), then conv -> [BN] -> ReLU.

    With `recompute` on, a unit in training keeps only its input for the backward pass and runs it again
    there (torch.utils.checkpoint), instead of storing the conv's and BN's outputs. The result and the
    gradients are the same; the recomputation leaves BN's running statistics as they were.
    On a frozen input the leading parameter-free layers run outside the checkpoint: they record nothing, and
    the checkpoint then keeps their output, which a max-pool makes 4x smaller than its input.
    """

    recompute: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.recompute and self.training and torch.is_grad_enabled()):
            return super().forward(x)
        layers = list(self)
        if not x.requires_grad:
            while not isinstance(layers[0], nn.Conv2d):
                x = layers.pop(0)(x)
        norms = [m for m in layers if isinstance(m, nn.modules.batchnorm._BatchNorm)]

        def run(x: torch.Tensor) -> torch.Tensor:
            for m in layers:
                x = m(x)
            return x

        # No RNG inside a unit, so there is no RNG state to save and restore.
        return checkpoint(
            run, x, use_reentrant=False, preserve_rng_state=False, context_fn=lambda: (nullcontext(), _Kept(norms))
        )


class _Kept:
    """Context of each recomputation: BN buffers (running mean, variance, batch count) are restored after it."""

    def __init__(self, norms: list[nn.Module]):
        self.norms = norms

    def __enter__(self) -> None:
        self.saved = [[b.clone() for b in m.buffers()] for m in self.norms]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for m, values in zip(self.norms, self.saved, strict=True):
                for b, v in zip(m.buffers(), values, strict=True):
                    b.copy_(v)


def set_recompute(net: nn.Module, on: bool) -> None:
    """Turn activation recomputation on or off in every conv unit of `net` (see ConvUnit); a staged network's
    other blocks and heads are recomputed whole (see recomputed)."""
    for m in net.modules():
        if isinstance(m, ConvUnit):
            m.recompute = on
    if hasattr(net, "recompute"):
        net.recompute = on


def has_conv_units(module: nn.Module) -> bool:
    return any(isinstance(m, ConvUnit) for m in module.modules())


def recomputed(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x), keeping only x for the backward pass, which runs the module again: torch.utils.checkpoint
    with the RNG state kept (dropout draws the same masks) and BatchNorm statistics updated once."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return checkpoint(
        module, x, use_reentrant=False, preserve_rng_state=True, context_fn=lambda: (nullcontext(), _Kept(norms))
    )


class Block(ConvUnit):
    """[P] -> 3x3 conv (padding 1) -> [BatchNorm] -> ReLU.

    `downsample` is None, "s2d" (space-to-depth: the conv sees 4x the channels at half the size) or
    "maxpool" (VGG: 2x2 max-pool, channels unchanged).
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: str | None, batchnorm: bool, bias: bool):
        layers: list[nn.Module] = []
        if downsample == "s2d":
            layers.append(SpaceToDepth())
            in_channels *= 4
        elif downsample == "maxpool":
            layers.append(nn.MaxPool2d(2))
        elif downsample is not None:
            raise ValueError(f"unknown downsample {downsample!r}")
        layers.append(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm2d(out_channels))
        # In place: the conv/BN output is not needed for the backward pass of ReLU.
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)

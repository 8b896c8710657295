"""A run's network, built and checked before anything is written: sized on the meta device first, then built,
loaded and probed with one blank image, every problem one line. Training and serving both build it here."""

from __future__ import annotations

import torch

from layerwise.config import RunConfig
from layerwise.device import Precision
from layerwise.errors import LayerwiseError
from layerwise.models import build_model
from layerwise.models.blocks import set_recompute
from layerwise.models.staged import StagedNet
from layerwise.sizing import check_size
from layerwise.stages import place_for, plan_stages


def checked_model(
    cfg: RunConfig,
    num_classes: int,
    precision: Precision,
    state: dict | None = None,
    mode: str | None = None,
    processes: int = 1,
) -> StagedNet:
    """Size the network on the meta device (sizing.check_size; with a `mode`, also a training step's activations
    for the batch share of each of `processes`), then build it (channels_last where the precision says), load
    `state` if given, and run one blank image through every block and head on the CPU, all before anything is
    written: problems become one line.

    Then the whole network goes to the device, or with a `mode` only what that strategy's first stage runs
    (place_for).
    """
    size, channels, device = cfg.data.image_size, cfg.model.in_channels, precision.device
    check_size(cfg, num_classes, device, None if mode is None else cfg.train.batch_size // max(1, processes), mode)
    try:
        net = build_model(cfg.model, num_classes, size)
        set_recompute(net, cfg.train.recompute_activations)
        if state is not None:
            net.load_state_dict(state)
        if precision.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.downsamples = downsamples(net, torch.zeros(1, channels, size, size))
    except (RuntimeError, ValueError) as e:
        raise LayerwiseError(
            f"the model cannot be built or run on {channels}x{size}x{size} inputs ({str(e).splitlines()[0][:200]}); "
            "check the model settings and data.image_size"
            + ("; or the checkpoint is not this network's" if state is not None else "")
        ) from None
    try:
        if mode is None:
            return net.to(device)
        place_for(net, plan_stages(net.J, mode)[0], device)
    except torch.OutOfMemoryError:
        raise LayerwiseError(f"the network's weights do not fit in the memory of {device}") from None
    return net


@torch.no_grad()
def downsamples(net: StagedNet, x: torch.Tensor) -> list[bool]:
    """Run x through every block and head (eval mode); which blocks make the map smaller."""
    net.eval()
    out = []
    for block, head in zip(net.blocks, net.heads, strict=True):
        y = block(x)
        head(y)
        smaller = x.dim() == y.dim() == 4 and (y.shape[-2] < x.shape[-2] or y.shape[-1] < x.shape[-1])
        out.append(bool(smaller))
        x = y
    return out

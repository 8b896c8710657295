"""AugLocal (Ma et al., ICLR 2024, `ChenxiangMA/AugLocal`): every layer is a module, and the auxiliary network of
layer l is made of fresh copies of d_l later layers sampled evenly up to the network's last, then pooling and a
linear layer, with cross-entropy; d_l shrinks linearly with l (the pyramid, model.aux_pyramid = c). The last
d + 1 layers form the final module with the network's classifier. model.head=auglocal, model.aux_depth = d."""

from __future__ import annotations

import math

from torch import nn

from layerwise.config import ModelConfig
from layerwise.errors import LayerwiseError
from layerwise.models.heads import HeadSpec, LayerList, LinearHead, register_cut, register_head


def depths(layers: int, d: int, c: float) -> list[int]:
    """d_l of each layer l with an auxiliary network (the first layers - d - 1 of `layers`, the stem counted):
    max(1, round(d (1 - l c / K) + l c / K)) with K = layers - d - 2, the last of them; Python's round (half to
    even), as their code."""
    k = layers - d - 2
    return [max(1, round(d * (1 - i * c / k) + i * c / k)) if k > 0 else d for i in range(layers - d - 1)]


def sampled(layer: int, layers: int, depth: int) -> list[int]:
    """The later layers whose copies make layer l's auxiliary network: round(l + (layers - l - 1) / depth x i) for
    i = 1..depth, which always ends at the last layer; every later layer when depth reaches their number."""
    if depth >= layers - 1 - layer:
        return list(range(layer + 1, layers))
    return [round(layer + (layers - layer - 1) / depth * i) for i in range(1, depth + 1)]


def strides(sides: list[int], start: int) -> list[int]:
    """The copies' strides: each copy owes log2 of how much smaller its layer's output is than the one before
    (from `start` px), and pays a stride of 2 at a time while it owes any. Their code reads the widths (log2 of
    each over the one before), which halve the side where they double in the ResNets; the sides say the same for
    VGG's last stage, which pools without widening."""
    owed, out, side = 0, [], start
    for now in sides:
        owed += int(math.log2(side // now))
        stride = 2 if owed >= 1 else 1
        owed -= stride == 2
        out.append(stride)
        side = now
    return out


@register_cut("auglocal")
def per_layer(cfg: ModelConfig, layers: LayerList) -> list[int]:
    """Each layer a module but the last d + 1, which form the final one (their CIFAR scripts), so model.split =
    layers - d (0: the network has no model.split, as simcnn)."""
    count = len(layers.widths)
    split = count - cfg.aux_depth
    if split < 2 or cfg.split not in (0, split):
        raise LayerwiseError(
            f"bad config: model.head=auglocal makes each of the network's {count} layers a module and its last "
            f"model.aux_depth + 1 one module: "
            + (f"set model.split={split}" if split >= 2 else f"model.aux_depth must be below {count - 1}")
        )
    return [*layers.ends[: split - 1], layers.ends[-1]]


class AugLocalHead(nn.Sequential):
    """Copies of later layers (fresh weights; widths chained from the module's output, strides as `strides`),
    global average pooling, BatchNorm1d where the depth is 1, a linear layer to the classes."""

    def __init__(self, layers: list[nn.Module], channels: int, num_classes: int, norm: bool):
        tail = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), *([nn.BatchNorm1d(channels)] if norm else [])]
        super().__init__(*layers, *tail, nn.Linear(channels, num_classes))


@register_head("auglocal")
def auglocal_head(spec: HeadSpec) -> nn.Module:
    cfg, net = spec.cfg, spec.layers
    if net is None:
        raise LayerwiseError(
            "model.head=auglocal builds copies of the network's later layers: its builder must give HeadSpec.layers"
        )
    if spec.last:  # the final module's classifier is the network's own (assemble replaces this one)
        return LinearHead(spec.channels, spec.num_classes)
    count = len(net.widths)
    depth = depths(count, cfg.aux_depth, cfg.aux_pyramid)[spec.index]
    chosen = sampled(spec.index, count, depth)
    widths = [net.widths[j] for j in chosen]
    copies, channels = [], spec.channels
    for width, stride in zip(widths, strides([net.sides[j] for j in chosen], spec.side), strict=True):
        copies.append(net.rebuild(channels, width, stride))
        channels = width
    return AugLocalHead(copies, channels, spec.num_classes, norm=depth <= 1)

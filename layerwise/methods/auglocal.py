"""AugLocal (Ma et al., ICLR 2024, `ChenxiangMA/AugLocal`): every layer is a module, and the auxiliary network of
layer l is made of fresh copies of d_l later layers sampled evenly up to the network's last, then pooling and a
linear layer, with cross-entropy; d_l shrinks linearly with l (the pyramid, model.aux_pyramid = c). The last
d + 1 layers form the final module with the network's classifier. model.head=auglocal, model.aux_depth = d."""

from __future__ import annotations

import math

from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models.heads import HeadSpec, LinearHead, register_head


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


def strides(widths: list[int], start: int) -> list[int]:
    """The copies' strides: each copy owes log2 of its width over the one before (from `start` channels), and pays
    a stride of 2 at a time while it owes any, as their code does whatever the original layer's stride."""
    owed, out, channels = 0, [], start
    for width in widths:
        owed += int(math.log2(width // channels))
        stride = 2 if owed >= 1 else 1
        owed -= stride == 2
        out.append(stride)
        channels = width
    return out


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
            "model.head=auglocal builds copies of the network's later layers, which the library can rebuild for "
            "model.arch=cifar_resnet only"
        )
    if spec.last:  # the final module's classifier is the network's own (assemble replaces this one)
        return LinearHead(spec.channels, spec.num_classes)
    count = len(net.widths)
    depth = depths(count, cfg.aux_depth, cfg.aux_pyramid)[spec.index]
    chosen = sampled(spec.index, count, depth)
    widths = [net.widths[j] for j in chosen]
    copies, channels = [], spec.channels
    for width, stride in zip(widths, strides(widths, channels), strict=True):
        copies.append(net.rebuild(channels, width, stride))
        channels = width
    return AugLocalHead(copies, channels, spec.num_classes, norm=depth <= 1)

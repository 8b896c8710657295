"""ResNets cut into K locally trained modules, as InfoPro, DGL and their successors train them.

- `cifar_resnet`: He et al.'s CIFAR ResNets (6n+2 layers: ResNet-32, ResNet-110; not in torchvision), cut at
  InfoPro's split points for K = 2, 4, 8, 16 (its configs.py), evenly by residual blocks otherwise.
- `resnet`: torchvision's ResNet-18/34/50 cut at residual-block boundaries into K modules balanced by measured
  FLOPs (the stem joins the first module), optionally with a CIFAR stem (3x3 conv, stride 1, no max-pool).
- `vgg`: torchvision's VGG-BN cut at its pooling layers, balanced the same way.
- `split_modules`: any network's consecutive parts (a timm model's stem and stages) balanced the same way, for
  a builder of your own.

Every module but the last gets a library head (model.head); the last keeps the network's own classifier, so
the delivered network is the original one: `torchvision_state_dict` gives its state_dict in torchvision's keys.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from layerwise.config import ModelConfig
from layerwise.errors import LayerwiseError
from layerwise.models.blocks import Block
from layerwise.models.heads import HeadSpec, LayerList, make_head, module_ends
from layerwise.models.partition import balanced_cut, unit_flops
from layerwise.models.registry import register_model
from layerwise.models.staged import StagedNet


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (a 1x1 conv and BN where the shape changes,
    as InfoPro's CIFAR ResNets), then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


INFOPRO_CUTS = {
    32: {
        2: [(2, 1)],
        4: [(1, 2), (2, 1), (3, 0)],
        8: [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2)],
        16: [(0, 0), *((1, b) for b in range(5)), *((2, b) for b in range(5)), *((3, b) for b in range(4))],
    },
    110: {
        2: [(2, 8)],
        4: [(1, 11), (2, 7), (3, 3)],
        8: [(1, 4), (1, 11), (2, 0), (2, 7), (2, 14), (3, 3), (3, 10)],
        16: [
            *((1, b) for b in (1, 4, 7, 10, 13, 16)),
            *((2, b) for b in (1, 4, 7, 11, 15)),
            *((3, b) for b in (1, 5, 9, 13)),
        ],
    },
}
"""InfoPro's split points (blackfeather-wang/InfoPro-Pytorch, networks/configs.py): (stage, block) after which a
local loss is taken; stage 0 is the stem, stages 1-3 the three stages of residual blocks, blocks count from 0."""


def cifar_units(depth: int, in_channels: int) -> list[tuple[str, nn.Module]]:
    """The stem and the 3n residual blocks of a 6n+2-layer CIFAR ResNet, named as in InfoPro's code."""
    n = (depth - 2) // 6
    units = [("stem", nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()))]
    channels = 16
    for s, width in enumerate((16, 32, 64), start=1):
        for b in range(n):
            units.append((f"layer{s}_{b}", BasicBlock(channels, width, 2 if b == 0 and s > 1 else 1)))
            channels = width
    return units


def even_ends(count: int, k: int) -> list[int]:
    """Where each of k modules of `count` units ends (exclusive), as even as whole units allow."""
    return [round(count * (i + 1) / k) for i in range(k)]


def check_split(cfg: ModelConfig, points: int, what: str) -> None:
    if not 1 <= cfg.split <= points:
        raise LayerwiseError(f"bad config: model.split={cfg.split} must be between 1 and {points}, the {what}")


def assemble(units: list[tuple[str, nn.Module]], ends: list[int], classifier: nn.Module,
             shapes: list[tuple[int, int]], cfg: ModelConfig, num_classes: int,
             layers: LayerList | None = None) -> StagedNet:  # fmt: skip
    """Modules of the named units ending at `ends`; a library head after each but the last, which ends in the
    network's own classifier. `shapes[i]` is unit i's output (channels, side); `layers`, the units as a method
    that copies them rebuilds them."""
    blocks, heads, start = [], [], 0
    for i, end in enumerate(ends):
        blocks.append(nn.Sequential(OrderedDict(units[start:end])))
        channels, side = shapes[end - 1]
        heads.append(make_head(HeadSpec(channels, num_classes, cfg, side, i, len(ends), layers)))
        start = end
    heads[-1] = classifier
    return StagedNet(blocks, heads)


def layer_list(shapes: Sequence[tuple[int, int]], ends: Sequence[int], rebuild) -> LayerList:
    """The LayerList of layers with output `shapes` (channels, side) ending at `ends` among the units."""
    return LayerList(tuple(c for c, _ in shapes), tuple(s for _, s in shapes), tuple(ends), rebuild)


def torchvision_block(kind: type[nn.Module]):
    """rebuild(in_channels, out_channels, stride) of torchvision's BasicBlock or Bottleneck (out_channels counts
    the expansion), with torchvision's 1x1 conv + BN shortcut where the shape changes."""

    def rebuild(in_channels: int, channels: int, stride: int) -> nn.Module:
        downsample = None
        if stride != 1 or in_channels != channels:
            downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        return kind(in_channels, channels // kind.expansion, stride, downsample)

    return rebuild


def vgg_layer(in_channels: int, channels: int, stride: int) -> nn.Module:
    """rebuild of a VGG-BN layer: [2x2 max-pool where stride 2] -> conv3x3 (bias) -> BN -> ReLU."""
    return Block(in_channels, channels, "maxpool" if stride == 2 else None, batchnorm=True, bias=True)


def he_init(net: nn.Module) -> None:
    """InfoPro's initialisation: every conv N(0, 2 / (k*k*out_channels)) (He, fan-out), BN weight 1, bias 0."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model("cifar_resnet")
def cifar_resnet(cfg: ModelConfig, num_classes: int, image_size: int = 32) -> StagedNet:
    """He et al.'s CIFAR ResNet of model.depth = 6n+2 layers (32, 110, ...), cut into model.split = K modules."""
    if cfg.depth < 8 or (cfg.depth - 2) % 6:
        raise LayerwiseError(
            f"bad config: model.depth must be 6n+2 for cifar_resnet (20, 32, 56, 110; got {cfg.depth})"
        )
    n = (cfg.depth - 2) // 6
    units = cifar_units(cfg.depth, cfg.in_channels)
    check_split(cfg, len(units), f"{len(units)} units of ResNet-{cfg.depth} (its stem and {3 * n} residual blocks)")
    cuts = INFOPRO_CUTS.get(cfg.depth, {}).get(cfg.split)
    sides = [image_size] * (1 + n) + [-(-image_size // 2)] * n + [-(-image_size // 4)] * n  # stride 2, padding 1
    shapes = list(zip([16] + [16] * n + [32] * n + [64] * n, sides, strict=True))
    layers = layer_list(shapes, range(1, len(units) + 1), BasicBlock)

    def own() -> list[int]:
        if cuts is not None:
            return [(0 if s == 0 else 1 + (s - 1) * n + b) + 1 for s, b in cuts] + [len(units)]
        if cfg.split == len(units):  # one unit per module, the stem alone first
            return list(range(1, len(units) + 1))
        return [1 + e for e in even_ends(3 * n, cfg.split)]  # the stem joins the first module

    ends = module_ends(cfg, layers, own)
    classifier = nn.Sequential(
        OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(64, num_classes))
    )
    net = assemble(units, ends, classifier, shapes, cfg, num_classes, layers)
    he_init(net)
    return net


@register_model("resnet")
def resnet(cfg: ModelConfig, num_classes: int, image_size: int = 224) -> StagedNet:
    """torchvision's ResNet of model.depth (18, 34, 50, 101, 152), cut into model.split = K modules at residual
    block boundaries balanced by FLOPs at image_size; model.stem=cifar swaps in a 3x3 stride-1 conv and no
    max-pool."""
    import torchvision

    if cfg.depth not in (18, 34, 50, 101, 152):
        raise LayerwiseError(f"bad config: model.depth must be 18, 34, 50, 101 or 152 for resnet (got {cfg.depth})")
    model = getattr(torchvision.models, f"resnet{cfg.depth}")(num_classes=num_classes)
    if cfg.stem == "cifar" or cfg.in_channels != 3:
        kernel, stride, padding = (3, 1, 1) if cfg.stem == "cifar" else (7, 2, 3)
        model.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel, stride, padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if cfg.stem == "cifar":
        model.maxpool = nn.Identity()
    stem = [("conv1", model.conv1), ("bn1", model.bn1), ("relu", model.relu), ("maxpool", model.maxpool)]
    blocks = [(f"layer{s}_{b}", block) for s in range(1, 5) for b, block in enumerate(getattr(model, f"layer{s}"))]
    check_split(cfg, len(blocks), f"{len(blocks)} residual blocks of ResNet-{cfg.depth}")
    units = [*stem, *blocks]  # the stem's four layers keep torchvision's names in the first module
    costs, shapes = unit_flops([u for _, u in units], (cfg.in_channels, image_size, image_size))
    shapes = [(shape[1], shape[2]) for shape in shapes]
    layer_ends = range(len(stem), len(units) + 1)  # the stem one layer, then each block
    layers = layer_list([shapes[e - 1] for e in layer_ends], layer_ends, torchvision_block(type(blocks[0][1])))
    ends = module_ends(cfg, layers, lambda: balanced_cut(costs, cfg.split, first=len(stem) + 1))  # stem + a block
    classifier = nn.Sequential(OrderedDict(avgpool=model.avgpool, flatten=nn.Flatten(), fc=model.fc))
    return assemble(units, ends, classifier, shapes, cfg, num_classes, layers)


@register_model("vgg")
def vgg(cfg: ModelConfig, num_classes: int, image_size: int = 224) -> StagedNet:
    """torchvision's VGG-BN of model.depth (11, 13, 16, 19) cut into model.split = K modules at its pooling
    layers, balanced by FLOPs at image_size; the last keeps VGG's average pooling and classifier."""
    import torchvision

    if cfg.depth not in (11, 13, 16, 19):
        raise LayerwiseError(f"bad config: model.depth must be 11, 13, 16 or 19 for vgg (got {cfg.depth})")
    model = getattr(torchvision.models, f"vgg{cfg.depth}_bn")(num_classes=num_classes)
    layers = list(model.features)
    if cfg.in_channels != 3:
        layers[0] = nn.Conv2d(cfg.in_channels, layers[0].out_channels, 3, padding=1)
    pools = [i + 1 for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    segments = [nn.Sequential(*layers[a:b]) for a, b in zip([0, *pools[:-1]], pools, strict=True)]

    def own() -> list[int]:
        check_split(cfg, len(segments), f"{len(segments)} pooling stages of VGG-{cfg.depth}")
        costs, _ = unit_flops(segments, (cfg.in_channels, image_size, image_size))
        return [pools[e - 1] for e in balanced_cut(costs, cfg.split)]

    named = [(f"features_{i}", m) for i, m in enumerate(layers)]
    per_layer, side = [], image_size  # (channels, side) after each layer
    for m in layers:
        side = side // 2 if isinstance(m, nn.MaxPool2d) else side
        per_layer.append((m.out_channels if isinstance(m, nn.Conv2d) else per_layer[-1][0], side))
    relus = [i + 1 for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]  # a layer: [pool] conv BN ReLU
    convs = layer_list([per_layer[e - 1] for e in relus], [*relus[:-1], len(layers)], vgg_layer)
    ends = module_ends(cfg, convs, own)
    classifier = nn.Sequential(OrderedDict(avgpool=model.avgpool, flatten=nn.Flatten(), classifier=model.classifier))
    return assemble(named, ends, classifier, per_layer, cfg, num_classes, convs)


def split_modules(units: Sequence[nn.Module], k: int, image: tuple[int, int, int]) -> list[nn.Sequential]:
    """Consecutive units of a network (its plain sequential parts: a timm model's stem and stages, say) in k
    modules balanced by their FLOPs on one image of shape (channels, height, width), measured on the meta
    device. A builder returns them as its stages (model.arch=custom)."""
    units = list(units)
    if not 1 <= k <= len(units):
        raise LayerwiseError(f"cannot cut {len(units)} units into {k} modules; choose K between 1 and {len(units)}")
    costs, _ = unit_flops(units, image)
    ends = balanced_cut(costs, k)
    return [nn.Sequential(*units[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def torchvision_state_dict(net: StagedNet) -> dict[str, torch.Tensor]:
    """The delivered network of a split torchvision ResNet or VGG (every module and the last head) as the
    state_dict of torchvision's own class (with the same stem change, for model.stem=cifar)."""
    state = {}
    last = len(net.blocks) - 1
    for key, value in net.state_dict().items():
        match = re.fullmatch(r"blocks\.\d+\.(.+)", key) or re.fullmatch(rf"heads\.{last}\.(.+)", key)
        if match is None:
            continue  # an auxiliary head: not part of the delivered network
        name = re.sub(r"^layer(\d)_(\d+)\.", r"layer\1.\2.", match.group(1))
        name = re.sub(r"^features_(\d+)\.", r"features.\1.", name)
        if name.startswith(("avgpool.", "flatten.")):
            continue
        state[name] = value
    return state

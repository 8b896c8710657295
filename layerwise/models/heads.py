"""Auxiliary classifiers C_j that turn a block's output x_{j+1} into class scores z_{j+1}, and make_head, which
builds model.head's kind for a module from a HeadSpec. A local-learning method's heads (layerwise/methods/)
register their kind with `register_head`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from layerwise.config import ModelConfig
from layerwise.errors import LayerwiseError, brief
from layerwise.models.blocks import ConvUnit
from layerwise.registering import Registry


def conv_bn_relu(in_channels: int, out_channels: int, padding: int, batchnorm: bool = True) -> ConvUnit:
    """3x3 conv -> BN -> ReLU; without BN the conv has a bias."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=not batchnorm)
    norm = [nn.BatchNorm2d(out_channels)] if batchnorm else []
    return ConvUnit(conv, *norm, nn.ReLU(inplace=True))


@dataclass(frozen=True)
class HeadLayout:
    """The options of the paper's head: average to `pool` x `pool` before the linear layer; `prepool` first averages
    the map to half its size and `padding` is the head convs' padding (the VGG-11 heads: prepool=True, padding=0);
    `batchnorm=False` drops every BN of the head."""

    pool: int = 2
    prepool: bool = False
    padding: int = 1
    batchnorm: bool = True


class AuxClassifier(nn.Sequential):
    """The paper's head for the paper's k: (k-1) x [3x3 conv -> BN -> ReLU] -> average to pool x pool -> BN -> linear.

    For k = 1 it is just averaging, BN and linear. `layout`: HeadLayout.
    """

    def __init__(self, in_channels: int, width: int, k: int, num_classes: int, layout: HeadLayout = HeadLayout()):
        pool, prepool, padding, batchnorm = layout.pool, layout.prepool, layout.padding, layout.batchnorm
        layers: list[nn.Module] = []
        if prepool:
            layers.append(HalfAvgPool())
        channels = in_channels
        for _ in range(k - 1):
            layers.append(conv_bn_relu(channels, width, padding, batchnorm))
            channels = width
        layers.append(nn.AdaptiveAvgPool2d(pool))
        if batchnorm:
            layers.append(nn.BatchNorm2d(channels))
        layers += [nn.Flatten(), nn.Linear(channels * pool * pool, num_classes)]
        super().__init__(*layers)


class HalfAvgPool(nn.Module):
    """Adaptive average pooling to half the input's spatial size (the VGG heads' first step)."""

    def forward(self, x):
        h, w = x.shape[-2:]
        return nn.functional.adaptive_avg_pool2d(x, (max(h // 2, 1), max(w // 2, 1)))


class VGGClassifier(nn.Sequential):
    """VGG's own classifier, kept as the last head of VGG-11: maxpool, 7x7 average, 25088 -> 4096 -> 4096 -> classes.

    `dropout` before each hidden layer: 0 in the released greedy VGG-11, 0.5 in torchvision's vgg11_bn (the
    layers stay, as identities at 0, so checkpoints of both have the same keys)."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 4096, dropout: float = 0.0):
        super().__init__(
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7),  # identity at 224 px, as in torchvision's VGG
            nn.Flatten(),
            nn.Linear(in_channels * 7 * 7, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )


class InfoProHead(nn.Sequential):
    """The head of InfoPro's classification experiments (Wang et al., ICLR 2021; its '1c2f' auxiliary net): one
    3x3 conv -> BN -> ReLU, global average pooling, then linear -> ReLU -> linear.

    The conv doubles narrow maps at stride 2 (InfoPro's 16 -> 32 and 32 -> 64 channels) and keeps 64 or more
    channels at stride 1, as InfoPro's 64 -> 64; `hidden` is its feature dimension, 128.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128):
        width, stride = (2 * in_channels, 2) if in_channels < 64 else (in_channels, 1)
        super().__init__(
            nn.Conv2d(in_channels, width, 3, stride, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )


class LinearHead(nn.Sequential):
    """Global average pooling, then one linear layer (with bias): InfoPro's 'Greedy SL' head ('0c1f').
    (B, C, H, W) -> (B, C) -> (B, classes)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


class QuarterAvgPool(nn.Module):
    """Adaptive average pooling to a quarter of the input's spatial size, rounded up (DGL's heads' first step):
    (B, C, H, W) -> (B, C, ceil(H/4), ceil(W/4))."""

    def forward(self, x):
        h, w = x.shape[-2:]
        return nn.functional.adaptive_avg_pool2d(x, (-(-h // 4), -(-w // 4)))


class DGLHead(nn.Sequential):
    """DGL's auxiliary network (Belilovsky et al., ICML 2020; its 'mlp-sr' default): average to a quarter of the
    map's size, three 1x1 conv (C -> C, no bias) -> BN -> ReLU, average to exactly 2x2, then three linear (4C ->
    4C, with bias) -> BN -> ReLU and a linear to the classes.

    (B, C, H, W) -> (B, C, ceil(H/4), ceil(W/4)) -> (B, C, 2, 2) -> (B, 4C) -> (B, classes). A map of 4 px or
    less is 1x1 after the first pooling, and the 2x2 pooling repeats its value, as DGL's code does.
    """

    def __init__(self, in_channels: int, num_classes: int):
        c, features = in_channels, 4 * in_channels
        layers: list[nn.Module] = [QuarterAvgPool()]
        for _ in range(3):
            layers += [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten()]
        for _ in range(3):
            layers += [nn.Linear(features, features), nn.BatchNorm1d(features), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(features, num_classes))
        super().__init__(*layers)


FIXED_HEADS: dict[str, type[nn.Module]] = {"infopro": InfoProHead, "dgl": DGLHead, "linear": LinearHead}
"""model.head's kinds of a fixed form, each built from (channels, num_classes); `paper` follows model.k and the aux
settings. config.HEADS names the library's kinds, the methods' among them."""


@dataclass(frozen=True)
class LayerList:
    """A network's layers as a method that cuts the network between them or copies them sees them (AugLocal): each
    layer's output `widths` (channels) and `sides` (px square), where it `ends` among the builder's units
    (exclusive), and `rebuild(in_channels, out_channels, stride)`, a fresh layer of the network's kind (stride 2
    halves the side)."""

    widths: tuple[int, ...]
    sides: tuple[int, ...]
    ends: tuple[int, ...]
    rebuild: Callable[[int, int, int], nn.Module]


Cut = Callable[[ModelConfig, LayerList], list[int]]
_CUTS: Registry[Cut] = Registry("a head kind's cut")


def register_cut(kind: str) -> Callable[[Cut], Cut]:
    """Register `cut(cfg, layers) -> ends`: where the modules end among the builder's units (LayerList.ends), for
    a head kind that decides the modules itself (AugLocal: one per layer). A builder asks with module_ends."""
    return _CUTS.register(kind)


def module_ends(cfg: ModelConfig, layers: LayerList | None, own: Callable[[], list[int]]) -> list[int]:
    """Where each module ends among a builder's units: model.head's own cut of `layers` where the kind has one,
    else the builder's (`own()`). A builder that cannot list its layers passes None, and such a kind is refused."""
    cut = _CUTS.entries.get(cfg.head)
    if cut is None:
        return own()
    if layers is None:
        raise LayerwiseError(
            f"bad config: model.head={cfg.head} cuts the network between its layers and rebuilds them, which the "
            "library can do for model.arch cifar_resnet, resnet, vgg and simcnn (a builder of your own passes a "
            "LayerList: docs/usage.md)"
        )
    return cut(cfg, layers)


@dataclass(frozen=True)
class HeadSpec:
    """What a library head is built from: the `channels` of the block output it reads (maps `side` px square; 0
    where the builder does not know), the classes, the model config, and its module's place: `index` of `modules`
    (the last module's head is the delivered network's classifier, which a method leaves plain), and where the
    builder can give them, the network's layers (one module per layer: AugLocal)."""

    channels: int
    num_classes: int
    cfg: ModelConfig
    side: int = 0
    index: int = 0
    modules: int = 1
    layers: LayerList | None = None

    @property
    def last(self) -> bool:
        return self.index == self.modules - 1


HeadMaker = Callable[[HeadSpec], nn.Module]
_MAKERS: Registry[HeadMaker] = Registry("a head kind")


def register_head(kind: str) -> Callable[[HeadMaker], HeadMaker]:
    """Register `make(spec: HeadSpec) -> nn.Module` as model.head=`kind` (a method's file does; a head whose
    output is not class scores says so with `classifies = False`, and its loss registers with
    layerwise.losses.register_losses)."""
    return _MAKERS.register(kind)


def head_kinds() -> list[str]:
    """Every registered model.head kind, sorted (the library's own register when layerwise.models is imported)."""
    return _MAKERS.names()


def make_head(spec: HeadSpec) -> nn.Module:
    """The head of model.head's kind for one module (HeadSpec)."""
    kind = spec.cfg.head
    if kind not in _MAKERS.entries:
        raise LayerwiseError(f"bad config: model.head must be one of {', '.join(head_kinds())} (got {brief(kind)})")
    return _MAKERS.entries[kind](spec)


@register_head("paper")
def paper_head(spec: HeadSpec) -> AuxClassifier:
    """The paper's head for model.k, its convs model.aux_width wide (or model.aux_width_factor x channels)."""
    cfg, channels = spec.cfg, spec.channels
    width = cfg.aux_width or max(1, round(cfg.aux_width_factor * channels))
    layout = HeadLayout(cfg.head_pool, batchnorm=cfg.head_batchnorm)
    return AuxClassifier(channels, width, cfg.k, spec.num_classes, layout)


def fixed_head(spec: HeadSpec) -> nn.Module:
    """A head of a fixed form (FIXED_HEADS)."""
    return FIXED_HEADS[spec.cfg.head](spec.channels, spec.num_classes)


for _kind in FIXED_HEADS:
    register_head(_kind)(fixed_head)

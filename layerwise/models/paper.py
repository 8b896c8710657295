"""The paper's networks, registered: SimCNN (P is space-to-depth) and VGG-11-BN cut into blocks at every conv."""

from __future__ import annotations

from torch import nn

from layerwise.config import ModelConfig
from layerwise.models.blocks import Block
from layerwise.models.heads import AuxClassifier, HeadLayout, HeadSpec, LayerList, VGGClassifier, make_head, module_ends
from layerwise.models.registry import register_model
from layerwise.models.staged import StagedNet


@register_model("simcnn")
def simcnn(cfg: ModelConfig, num_classes: int, image_size: int = 32) -> StagedNet:
    """Blocks [P] -> conv3x3 -> [BN] -> ReLU of model.widths, each with the paper's head for model.k (or
    model.head's other kind: heads.make_head)."""
    shapes, side = [], image_size
    for j, width in enumerate(cfg.widths):
        side = side // 2 if j in cfg.downsample_at else side
        shapes.append((width, side))
    count, make = len(shapes), rebuild(cfg)
    listed = LayerList(tuple(cfg.widths), tuple(s for _, s in shapes), tuple(range(1, count + 1)), make)
    ends = module_ends(cfg, listed, lambda: list(range(1, count + 1)))
    blocks, heads, channels = [], [], cfg.in_channels
    for i, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):  # a module of several: AugLocal's last
        layers = []
        for j in range(start, end):  # each block, then its module's head: the draws of the paper's order
            layers.append(make(channels, cfg.widths[j], 2 if j in cfg.downsample_at else 1))
            channels = cfg.widths[j]
        blocks.append(layers[0] if len(layers) == 1 else nn.Sequential(*layers))
        heads.append(make_head(HeadSpec(channels, num_classes, cfg, shapes[end - 1][1], i, len(ends), listed)))
    net = StagedNet(blocks, heads)
    if cfg.bn_weight_init == "uniform":  # PyTorch 0.4's BatchNorm: weight ~ U[0, 1), bias 0
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight)
    return net


@register_model("vgg11")
def vgg11(cfg: ModelConfig, num_classes: int, image_size: int = 224) -> StagedNet:
    """VGG-11-BN, one block per conv (P a max-pool), the paper's VGG heads, and VGG's classifier last."""
    blocks, heads, channels = [], [], cfg.in_channels
    for j, width in enumerate(cfg.widths):
        blocks.append(Block(channels, width, "maxpool" if j in cfg.downsample_at else None, cfg.batchnorm, _bias(cfg)))
        channels = width
        if j == len(cfg.widths) - 1:
            heads.append(VGGClassifier(width, num_classes, dropout=cfg.classifier_dropout))
        else:  # the paper's VGG heads: average to half size, then k-1 unpadded convs at twice the width
            layout = HeadLayout(cfg.head_pool, prepool=True, padding=0, batchnorm=cfg.head_batchnorm)
            aux = AuxClassifier(width, 2 * width, cfg.k, num_classes, layout)
            heads.append(aux)
    net = StagedNet(blocks, heads)
    init_vgg(net)
    return net


def rebuild(cfg: ModelConfig):
    """rebuild(in_channels, out_channels, stride) of a SimCNN block (stride 2: with P, space-to-depth)."""

    def block(in_channels: int, channels: int, stride: int) -> Block:
        return Block(in_channels, channels, "s2d" if stride == 2 else None, cfg.batchnorm, _bias(cfg))

    return block


def _bias(cfg: ModelConfig) -> bool:
    return (not cfg.batchnorm) if cfg.conv_bias is None else cfg.conv_bias


def init_vgg(net: nn.Module) -> None:
    """torchvision's VGG initialisation: Kaiming fan-out for convs, N(0, 0.01) for linear layers."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)

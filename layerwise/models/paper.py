"""The paper's networks, registered: SimCNN (P is space-to-depth) and VGG-11-BN cut into blocks at every conv."""

from __future__ import annotations

from torch import nn

from layerwise.config import ModelConfig
from layerwise.models.blocks import Block
from layerwise.models.heads import AuxClassifier, HeadLayout, HeadSpec, VGGClassifier, make_head
from layerwise.models.registry import register_model
from layerwise.models.staged import StagedNet


@register_model("simcnn")
def simcnn(cfg: ModelConfig, num_classes: int, image_size: int = 32) -> StagedNet:
    """Blocks [P] -> conv3x3 -> [BN] -> ReLU of model.widths, each with the paper's head for model.k (or
    model.head's other kind: heads.make_head)."""
    blocks, heads, channels, side = [], [], cfg.in_channels, image_size
    for j, width in enumerate(cfg.widths):
        blocks.append(Block(channels, width, "s2d" if j in cfg.downsample_at else None, cfg.batchnorm, _bias(cfg)))
        channels, side = width, side // 2 if j in cfg.downsample_at else side
        heads.append(make_head(HeadSpec(width, num_classes, cfg, side, j, len(cfg.widths))))
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

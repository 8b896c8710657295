"""Auxiliary classifiers C_j that turn a block's output x_{j+1} into class scores z_{j+1}."""

from dataclasses import dataclass

from torch import nn

from layerwise.models.blocks import ConvUnit


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

"""Block j of the staged network: x_{j+1} = ReLU(BN(conv3x3(P x_j)))."""

from torch import nn

from layerwise.models.downsample import SpaceToDepth


class Block(nn.Sequential):
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

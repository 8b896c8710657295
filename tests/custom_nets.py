"""Networks of one's own for the tests, importable by path (tests.custom_nets:NAME) from the repository root, as
a user's module would be from theirs; plain torch only, so torchrun's processes can import it too."""

from torch import nn


def unit(cin: int, cout: int, stride: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def good(width: int = 4) -> list[nn.Module]:
    return [unit(3, width), nn.Sequential(unit(width, 2 * width, 2), nn.Dropout(0.3)), unit(2 * width, 2 * width)]


def plain(width: int = 4) -> list[nn.Module]:
    """No BatchNorm and no dropout: two processes train it exactly as one does."""
    return [
        nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU()),
    ]

"""P: the invertible 2x2 space-to-depth downsampling of the paper (as in i-RevNet)."""

import torch
from torch import nn
from torch.nn import functional as F


class SpaceToDepth(nn.Module):
    """(B, C, H, W) -> (B, 4C, H/2, W/2) by moving each 2x2 pixel neighbourhood into channels.

    A pure permutation of the entries, so it is invertible (see `inverse`) and preserves the norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2 or x.shape[-2] % 2:
            raise ValueError(f"space-to-depth needs even height and width, got {tuple(x.shape[-2:])}")
        return F.pixel_unshuffle(x, 2)

    @staticmethod
    def inverse(y: torch.Tensor) -> torch.Tensor:
        """(B, 4C, H, W) -> (B, C, 2H, 2W), the exact inverse of forward."""
        return F.pixel_shuffle(y, 2)

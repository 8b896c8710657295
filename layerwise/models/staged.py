"""The staged network: J blocks with one auxiliary head each, runnable up to any block."""

from __future__ import annotations

import torch
from torch import nn


class StagedNet(nn.Module):
    """blocks[j] maps x_j to x_{j+1}; heads[j] maps x_{j+1} to the class scores z_{j+1}.

    The final network, the one a greedy run delivers, is every block plus the last head.
    """

    def __init__(self, blocks: list[nn.Module], heads: list[nn.Module]):
        super().__init__()
        if len(blocks) != len(heads):
            raise ValueError("a staged network needs one head per block")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)
        self.recompute = False
        """train.recompute_activations for the blocks and heads not made of ConvUnits (blocks.set_recompute)."""
        self.downsamples = [False] * len(blocks)
        """Which blocks make the map smaller, as a probe found (delivered.checked_model)."""

    @property
    def J(self) -> int:
        return len(self.blocks)

    def forward_features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks[start:stop] on x, which must be the output of block start-1 (or the image if start=0)."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor, upto: int | None = None, heads: list[int] | None = None) -> list[torch.Tensor]:
        """Run blocks 0..upto once and return the logits of the requested heads (default: all of them).

        One pass gives every head's scores, which is all the ensemble needs.
        """
        upto = self.J - 1 if upto is None else upto
        wanted = set(range(upto + 1)) if heads is None else set(heads)
        logits = []
        for j in range(upto + 1):
            x = self.blocks[j](x)
            if j in wanted:
                logits.append(self.heads[j](x))
        return logits

    @property
    def classifying(self) -> list[int]:
        """The heads whose output is class scores: those evaluation, the ensemble, early exit and the report use
        (a method's head may give embeddings or nothing to classify with instead: `classifies = False`)."""
        return [j for j, head in enumerate(self.heads) if classifies(head)]

    def final_parameters(self) -> int:
        """Parameters of the delivered network: every block plus the last head."""
        return count(self.blocks) + count(self.heads[-1])

    def head_parameters(self) -> int:
        """Parameters of all auxiliary heads together (the last one included)."""
        return count(self.heads)


def classifies(head: nn.Module) -> bool:
    """Whether a head's output is class scores: every head's but one that says otherwise (`classifies = False`)."""
    return getattr(head, "classifies", True)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

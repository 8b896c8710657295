"""Local losses: what each loss head of a stage minimises, as objects composed from the config, one per head.

A loss is called with a `Seen`: what its head gave and read. The plain ones live here; a local-learning method's
own loss lives in its file under layerwise/methods/ beside its auxiliary network, and registers with
`register_losses`. A new local loss never changes the loop (layerwise/train/stage.py calls each head's loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.registering import Registry

if TYPE_CHECKING:
    from layerwise.config import RunConfig


@dataclass(frozen=True)
class Seen:
    """What a loss head's local loss reads: the head's `output` (its forward pass: (B, classes) scores, or (B, D)
    embeddings where it does not classify), the `targets` (labels (B,), or class probabilities (B, classes) when
    data.mix blends images), the block's output `features` that the head read ((B, C, H, W); None where it never
    forms whole: train.block_chunks, which the config keeps apart from any loss that reads it), the `head` itself
    (for parts only its loss uses: InfoPro's decoder, PredSim's sim conv) and the network's input `image` (the
    normalised (B, C, H, W) batch; None in a stage that starts after block 0)."""

    output: torch.Tensor
    targets: torch.Tensor
    features: torch.Tensor | None = None
    head: nn.Module | None = None
    image: torch.Tensor | None = None


class LocalLoss(Protocol):
    def __call__(self, seen: Seen) -> torch.Tensor: ...


@dataclass(frozen=True)
class CrossEntropy:
    """Cross-entropy of the scores (in float32) against labels or class probabilities, with train.label_smoothing
    (torch's: 1 - s + s / classes on the label, s / classes elsewhere; probabilities p become (1 - s) p + s /
    classes)."""

    label_smoothing: float = 0.0

    def __call__(self, seen: Seen) -> torch.Tensor:
        return F.cross_entropy(seen.output.float(), seen.targets, label_smoothing=self.label_smoothing)


PLAIN = CrossEntropy()
"""The paper's local loss: plain cross-entropy."""


def one_hot(targets: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, classes) float targets: labels (B,) one-hot, class probabilities as they are."""
    return targets.float() if targets.dim() == 2 else F.one_hot(targets, classes).float()


@dataclass(frozen=True)
class SimilarityMatching:
    """`weight` x Nokland & Eidnes's (2019) similarity-matching loss of the block output against the targets
    (one-hot labels, or the mixed probabilities), in float32 even under autocast (its matrix products would run
    in bf16)."""

    weight: float

    def __call__(self, seen: Seen) -> torch.Tensor:
        features = seen.features
        with torch.autocast(features.device.type, enabled=False):
            return self.weight * similarity_loss(features.float(), one_hot(seen.targets, seen.output.shape[-1]))


@dataclass(frozen=True)
class Sum:
    """The terms added up, in order."""

    terms: tuple[LocalLoss, ...]

    def __call__(self, seen: Seen) -> torch.Tensor:
        total = self.terms[0](seen)
        for term in self.terms[1:]:
            total = total + term(seen)
        return total


def plain_losses(cfg: RunConfig, heads: int) -> list[LocalLoss]:
    """Every head's loss for the heads that classify with cross-entropy (model.head paper, infopro, dgl, linear, a
    user's own): cross-entropy, plus the similarity term with train.sim_loss."""
    terms: list[LocalLoss] = [CrossEntropy(cfg.train.label_smoothing)]
    if cfg.train.sim_loss:
        terms.append(SimilarityMatching(cfg.train.sim_loss))
    return [terms[0] if len(terms) == 1 else Sum(tuple(terms))] * heads


Losses = Callable[["RunConfig", int], list[LocalLoss]]
_LOSSES: Registry[Losses] = Registry("the losses of a head kind")


def register_losses(head: str) -> Callable[[Losses], Losses]:
    """Register `losses(cfg, J) -> [each head's LocalLoss]` as the local losses of model.head=`head`'s heads
    (a method's file does, beside its heads)."""
    return _LOSSES.register(head)


def local_losses(cfg: RunConfig, heads: int) -> list[LocalLoss]:
    """The local loss of each of a network's `heads` heads: model.head's registered ones, else plain_losses. The
    last head is the delivered network's classifier in every method."""
    return _LOSSES.entries.get(cfg.model.head, plain_losses)(cfg, heads)


def similarities(x: torch.Tensor) -> torch.Tensor:
    """(B, B) cosine similarities of the batch's rows, each row centred over its entries first (Nokland & Eidnes
    2019); feature maps (B, C, H, W) with more than one position become each channel's standard deviation over
    the positions, as in their code."""
    x = x.float()
    if x.dim() == 4 and x.shape[2] * x.shape[3] > 1:
        x = x.flatten(2).std(dim=2)  # (B, C)
    x = x.flatten(1)
    x = x - x.mean(dim=1, keepdim=True)
    x = x / (x.norm(dim=1, keepdim=True) + 1e-8)
    return (x @ x.T).clamp(-1, 1)


def similarity_loss(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The similarity-matching loss: the mean squared difference between the similarities of the features and of
    the targets (one-hot labels or class probabilities)."""
    return F.mse_loss(similarities(features), similarities(targets))

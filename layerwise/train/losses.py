"""The local loss of a head: what each loss head of a stage minimises, as objects composed from the config.

A loss is called as loss(logits, y, features): the head's (B, classes) scores, the targets (labels (B,), or class
probabilities (B, classes) when data.mix blends images), and the (B, C, H, W) output of the block the head reads
(None where it never forms whole: train.block_chunks, which the config keeps apart from any term that reads it).
A new local loss is one more class here and one line in `local_loss`; the loop never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional as F

from layerwise.config import TrainConfig


class LocalLoss(Protocol):
    def __call__(self, logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class CrossEntropy:
    """Cross-entropy of the scores (in float32) against labels or class probabilities, with train.label_smoothing
    (torch's: 1 - s + s / classes on the label, s / classes elsewhere; probabilities p become (1 - s) p + s /
    classes)."""

    label_smoothing: float = 0.0

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)


PLAIN = CrossEntropy()
"""The paper's local loss: plain cross-entropy."""


@dataclass(frozen=True)
class SimilarityMatching:
    """`weight` x Nokland & Eidnes's (2019) similarity-matching loss of the block output against the targets
    (one-hot labels, or the mixed probabilities), in float32 even under autocast (its matrix products would run
    in bf16)."""

    weight: float

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        targets = y.float() if y.dim() == 2 else F.one_hot(y, logits.shape[-1]).float()  # (B, classes)
        with torch.autocast(features.device.type, enabled=False):
            return self.weight * similarity_loss(features.float(), targets)


@dataclass(frozen=True)
class Sum:
    """The terms added up, in order."""

    terms: tuple[LocalLoss, ...]

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        total = self.terms[0](logits, y, features)
        for term in self.terms[1:]:
            total = total + term(logits, y, features)
        return total


def local_loss(cfg: TrainConfig) -> LocalLoss:
    """The loss every loss head of a run minimises: cross-entropy, plus the similarity term with train.sim_loss."""
    terms: list[LocalLoss] = [CrossEntropy(cfg.label_smoothing)]
    if cfg.sim_loss:
        terms.append(SimilarityMatching(cfg.sim_loss))
    return terms[0] if len(terms) == 1 else Sum(tuple(terms))


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

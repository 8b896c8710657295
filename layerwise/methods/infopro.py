"""InfoPro (Wang et al., ICLR 2021, `blackfeather-wang/InfoPro-Pytorch`): module i's local loss is lambda1 x the
reconstruction of the image by a small decoder + lambda2 x a task loss on InfoPro's '1c2f' head, cross-entropy
(`infopro_softmax`) or the supervised contrastive loss of a 128-d projection (`infopro_contrast`); the lambdas
interpolate linearly from the first module to module K-1 (model.head_lambdas). Every module trains at once on the
image (train.mode=decoupled); the last is the network's own classifier with cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from layerwise.errors import LayerwiseError
from layerwise.losses import CrossEntropy, LocalLoss, Seen, register_losses
from layerwise.models.heads import HeadSpec, InfoProHead, register_head

RELEASED = {
    (32, 2): (5.0, 1.0, 0.0, 0.0),
    (32, 4): (6.0, 0.0, 1.0, 2.0),
    (32, 8): (5.0, 0.0, 0.0, 2.0),
    (32, 16): (5.0, 0.05, 0.2, 0.5),
    (110, 2): (5.0, 0.5, 0.0, 0.0),
    (110, 4): (1.0, 0.0, 0.0, 1.0),
    (110, 8): (5.0, 0.0, 0.0, 1.0),
    (110, 16): (5.0, 0.0, 0.5, 1.0),
}
"""InfoPro's released (lambda1, lambda2) of module 1, then of module K-1, for the CIFAR-10 ResNets by (depth, K):
their comand.sh, all for the Contrast variant (with K = 2 the second pair is never used)."""

FEATURES = 128
"""The contrastive projection's size, and the '1c2f' head's hidden size (their aux_net_feature_dim)."""


def interpolated(lambdas: tuple[float, ...], modules: int) -> list[tuple[float, float]]:
    """(lambda1, lambda2) of each of the `modules` - 1 local modules: module i (from 0) takes ratio i / (K - 2) of
    the way from the first pair to the second (ratio 0 when K = 2), as InfoPro's forward pass does."""
    first, last = lambdas[:2], lambdas[2:]
    pairs = []
    for i in range(modules - 1):
        r = i / (modules - 2) if modules > 2 else 0.0
        pairs.append((first[0] * (1 - r) + last[0] * r, first[1] * (1 - r) + last[1] * r))
    return pairs


def lambdas_for(spec_cfg, modules: int) -> list[tuple[float, float]]:
    """model.head_lambdas interpolated over the network's local modules; when unset, InfoPro's released pair for a
    cifar_resnet of model.depth in K = `modules` modules, else a one-line refusal."""
    given = tuple(spec_cfg.head_lambdas)
    if not given:
        given = RELEASED.get((spec_cfg.depth, modules)) if spec_cfg.arch == "cifar_resnet" else None
        if given is None:
            known = ", ".join(f"ResNet-{d} K={k}" for d, k in RELEASED)
            raise LayerwiseError(
                f"InfoPro released its lambdas for {known} only; set model.head_lambdas (lambda1, lambda2 of the "
                "first module, then of module K-1) for this network"
            )
    return interpolated(given, modules)


class Decoder(nn.Module):
    """InfoPro's decoder: the block output upsampled bilinearly (corners aligned) to the image's size, then 3x3 conv
    (C -> 12, bias) -> BN -> ReLU -> 3x3 conv (12 -> image channels, bias) -> sigmoid: (B, C, h, w) -> (B, c, H,
    W) in (0, 1)."""

    def __init__(self, in_channels: int, image_channels: int = 3, width: int = 12):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, image_channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.layers(F.interpolate(x, size=size, mode="bilinear", align_corners=True))


class InfoProAux(nn.Module):
    """One local module's InfoPro networks: the `decoder` and, where lambda2 > 0, the '1c2f' `task` head, giving
    class scores (Softmax) or an L2-normalised 128-d projection (Contrast). forward is the task head's output; a
    module without one gives (B, 0). `classifies` only with Softmax scores."""

    def __init__(self, in_channels: int, image_channels: int, outputs: int, task: bool, contrast: bool):
        super().__init__()
        self.decoder = Decoder(in_channels, image_channels)
        self.task = InfoProHead(in_channels, outputs, FEATURES) if task else None
        self.contrast = contrast
        self.classifies = task and not contrast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task is None:
            return x.new_zeros(len(x), 0)
        z = self.task(x)
        return F.normalize(z, dim=1) if self.contrast else z


def make_infopro(spec: HeadSpec, contrast: bool) -> nn.Module:
    if spec.last:  # the delivered network's classifier where the builder has none of its own (SimCNN)
        return InfoProHead(spec.channels, spec.num_classes, FEATURES)
    _, task = lambdas_for(spec.cfg, spec.modules)[spec.index]
    outputs = FEATURES if contrast else spec.num_classes
    return InfoProAux(spec.channels, spec.cfg.in_channels, outputs, task > 0, contrast)


@register_head("infopro_softmax")
def infopro_softmax_head(spec: HeadSpec) -> nn.Module:
    return make_infopro(spec, contrast=False)


@register_head("infopro_contrast")
def infopro_contrast_head(spec: HeadSpec) -> nn.Module:
    return make_infopro(spec, contrast=True)


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, temperature: float, base: float = 0.07):
    """Khosla et al.'s (2020) supervised contrastive loss of one view of each image, as InfoPro runs it: for each
    anchor i, the mean over the other images j of its class of log softmax_j(z_i . z_k / temperature) over all k
    != i; minus the mean over anchors, times temperature / base. An anchor alone in its class adds 0 (and still
    counts in the mean). z: (B, D), L2-normalised; labels (B,)."""
    z = z.float()
    scores = z @ z.T / temperature  # (B, B)
    own = torch.eye(len(z), dtype=torch.bool, device=z.device)
    scores = scores.masked_fill(own, -1e9)  # finite: a batch of one gives 0, not NaN
    log_prob = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~own  # (B, B)
    summed = log_prob.masked_fill(~positives, 0.0).sum(1)
    mean = summed / positives.sum(1).clamp(min=1)
    return -(temperature / base) * mean.mean()


@dataclass(frozen=True)
class InfoProLoss:
    """lambda1 x the binary cross-entropy of the decoder's reconstruction against the image un-normalised to [0, 1]
    (data.mean and data.std), + lambda2 x the task loss: cross-entropy of the scores (Softmax) or the supervised
    contrastive loss of the projection (Contrast). The decoder and both terms run in float32 outside autocast."""

    reconstruction: float
    task: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    temperature: float = 0.0
    """> 0: Contrast, at this temperature."""
    label_smoothing: float = 0.0

    def __call__(self, seen: Seen) -> torch.Tensor:
        image = seen.image  # (B, C, H, W), normalised
        if image is None:
            raise LayerwiseError(
                "InfoPro's loss compares a module's output with the image, which a stage that starts after block 0 "
                "never sees: train every module at once (train.mode=decoupled); `layerwise bench` times greedy "
                "stages and cannot measure it"
            )
        shape = (1, -1, 1, 1)
        pixels = image.float() * image.new_tensor(self.std).view(shape) + image.new_tensor(self.mean).view(shape)
        with torch.autocast(image.device.type, enabled=False):  # a bf16 sigmoid reaches 1.0 from a logit of 6.3
            rebuilt = seen.head.decoder(seen.features.float(), image.shape[-2:])
            loss = self.reconstruction * F.binary_cross_entropy(rebuilt, pixels.clamp(0, 1))
            if self.task > 0 and self.temperature > 0:
                loss = loss + self.task * supervised_contrastive(seen.output, seen.targets, self.temperature)
            elif self.task > 0:
                loss = loss + self.task * CrossEntropy(self.label_smoothing)(seen)
        return loss


def infopro_losses(cfg, heads: int, contrast: bool) -> list[LocalLoss]:
    smoothing, temperature = cfg.train.label_smoothing, cfg.model.head_temperature if contrast else 0.0
    mean, std = tuple(cfg.data.mean), tuple(cfg.data.std)
    local = [InfoProLoss(a, b, mean, std, temperature, smoothing) for a, b in lambdas_for(cfg.model, heads)]
    return [*local, CrossEntropy(smoothing)]


@register_losses("infopro_softmax")
def infopro_softmax_losses(cfg, heads: int) -> list[LocalLoss]:
    return infopro_losses(cfg, heads, contrast=False)


@register_losses("infopro_contrast")
def infopro_contrast_losses(cfg, heads: int) -> list[LocalLoss]:
    return infopro_losses(cfg, heads, contrast=True)

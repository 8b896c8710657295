"""Per-block and ensemble accuracy (top-1/top-5) from one forward pass over the data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch

from layerwise.data.loaders import Loader
from layerwise.distributed import SINGLE, Dist
from layerwise.models.staged import StagedNet


def ensemble_scores(logits: list[torch.Tensor], kind: str = "logits") -> list[torch.Tensor]:
    """Running ensembles Z_j = sum_{i<=j} 2^i z_i for every prefix of the heads' outputs.

    `kind="softmax"` sums 2^i softmax(z_i) instead (the released ImageNet code). Only the ratio of the
    weights matters for the argmax, so 2^i is scaled by 2^-j to stay finite for deep networks.
    """
    out, total = [], None
    for z in logits:
        total = add_to_ensemble(total, z, kind)
        out.append(total)
    return out


def add_to_ensemble(total: torch.Tensor | None, z: torch.Tensor, kind: str = "logits") -> torch.Tensor:
    """The running ensemble after one more head: 0.5 * total + z (softmax(z) for kind="softmax")."""
    z = z.float().softmax(-1) if kind == "softmax" else z.float()
    return z if total is None else 0.5 * total + z  # = 2^-j sum_i 2^i z_i


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of rows whose label is in the top-k scores, for each k (clamped to the number of classes)."""
    top = scores.topk(min(max(ks), scores.shape[-1]), dim=-1).indices
    hit = top == labels[:, None]
    return [hit[:, :k].any(-1).sum() for k in ks]


def evaluate(
    net: StagedNet,
    loader: Loader,
    blocks: list[int],
    ensemble: str = "logits",
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    memo: dict | None = None,
    where: Dist = SINGLE,
    flip: bool = False,
) -> dict:
    """Top-1/top-5 of each listed head and of the running ensemble over them, as percentages. With `flip` each
    head's logits are the mean of the image's and its horizontal mirror's (test-time flip), before the ensemble.

    Returns {"blocks": {j: {"top1", "top5", "ensemble_top1", "ensemble_top5"}}, "loss": the last head's loss,
    "losses": {j: each head's loss}, "n"}.
    Counts stay on the device until the end: one host sync per evaluation. Under DDP each process scores its
    shard of the images and the counts are summed over processes, so every image counts exactly once.

    `memo` (a dict kept across the evaluations of one greedy stage) skips the heads before the last one when
    they are frozen: their scores on the loader's fixed, unaugmented batches cannot change. The first call fills
    it with their counts and, per batch, their running ensemble; later calls run only the last head.
    """
    upto, last = max(blocks), blocks[-1]
    keep = memo is not None and len(blocks) > 1  # only heads before the last one can be frozen
    reuse = keep and "counts" in memo
    counts = torch.zeros(len(blocks), len(COUNTS), dtype=torch.float64, device=loader.device)  # (heads, COUNTS)
    totals = []  # the frozen heads' running ensemble, per batch
    n = 0
    with evaluating(net):
        for b, (x, y) in enumerate(loader.batches()):
            with torch.no_grad(), autocast():  # not a decorator: mutmut (docs/testing.md) skips decorated functions
                logits = flipped(net, x, flip, upto=upto, heads=[last] if reuse else blocks)  # [(B, classes)]
            if reuse:
                (z,) = logits
                counts[-1] += counted(z, add_to_ensemble(memo["totals"][b], z, ensemble), y)
            else:
                scores = ensemble_scores(logits, kind=ensemble)
                for i, (z, e) in enumerate(zip(logits, scores, strict=True)):
                    counts[i] += counted(z, e, y)
                if keep:
                    totals.append(scores[-2])
            n += len(y)
    if reuse:
        counts[:-1] = memo["counts"]
    elif keep:  # this process's counts: each process keeps a memo of its own shard
        memo.update(counts=counts[:-1].clone(), totals=totals)
    return figures(blocks, counts, n, where)


@contextmanager
def evaluating(net: torch.nn.Module) -> Iterator[None]:
    """The network in eval mode for the duration, back in the mode it was in afterwards."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


COUNTS = ("top1", "top5", "ensemble_top1", "ensemble_top5", "loss")
"""The columns of evaluation counts, one row per head: hits, hits of the running ensemble, summed loss."""


def counted(z: torch.Tensor, total: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One head's (len(COUNTS),) counts over a batch: its logits z (B, classes), the ensemble `total` up to it."""
    return torch.stack([*topk_correct(z.float(), y), *topk_correct(total, y), summed_loss(z, y)])


def figures(blocks: list[int], counts: torch.Tensor, n: int, where: Dist = SINGLE) -> dict:
    """evaluate()'s result from the counts (len(blocks), len(COUNTS)) over n images, both summed over `where`'s
    processes first."""
    *flat, n = where.sum(torch.cat([counts.flatten(), counts.new_tensor([n])])).tolist()
    per_head = torch.tensor(flat, dtype=torch.float64).view(len(blocks), len(COUNTS))
    n, loss = int(n), COUNTS.index("loss")
    pct = (100.0 * per_head[:, :loss] / max(n, 1)).tolist()  # (heads, hit columns)
    losses = (per_head[:, loss] / max(n, 1)).tolist()
    names = COUNTS[:loss]
    return {
        "blocks": {j: dict(zip(names, row, strict=False)) for j, row in zip(blocks, pct, strict=False)},
        "loss": losses[-1],
        "losses": dict(zip(blocks, losses, strict=True)),
        "n": n,
    }


def flipped(net, x: torch.Tensor, flip: bool, **options) -> list[torch.Tensor]:
    """net(x, **options); with `flip`, each head's logits averaged over x and x mirrored left to right, from one
    pass over both (evaluation's BatchNorm treats each image alone)."""
    if not flip:
        return net(x, **options)
    return [mirror_mean(z, len(x)) for z in net(with_mirrors(x), **options)]


def with_mirrors(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images -> (2B, C, H, W): the images, then each mirrored left to right."""
    return torch.cat([x, x.flip(-1)])


def mirror_mean(z: torch.Tensor, n: int) -> torch.Tensor:
    """(2n, classes) logits of with_mirrors' images -> (n, classes): each image's mean with its mirror's."""
    return (z[:n] + z[n:]) / 2


def summed_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()

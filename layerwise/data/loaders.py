"""Batch iterators. Both kinds yield normalised float batches already on the training device.

`MemoryLoader` keeps small datasets (CIFAR-10: 150 MB as uint8) on the device and augments whole batches
with vectorised ops, so no worker process or host->device copy sits in the training loop. `StreamLoader`
decodes files in DataLoader workers (ImageNet) and ships uint8 crops, normalised only after the copy.
Randomness comes from a generator seeded per epoch, so a resumed run sees exactly the batches it would have.

Under torchrun (`Dist`) `batch_size` is the global batch: every process draws the same epoch plan, cuts the
same global batches and takes its own contiguous share of each, so the processes together see exactly the
batches one process would. The last batch of an epoch is split as evenly as `tensor_split` makes it (shares
differ by at most one image); it is dropped only when it holds fewer images than there are processes.
Evaluation loaders hold every world_size-th image (`shard`), so each image is scored exactly once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from layerwise.config import DataConfig
from layerwise.data.images import read_image
from layerwise.data.sources import Decoded, Examples, Files
from layerwise.distributed import SINGLE, Dist
from layerwise.errors import LayerwiseError
from layerwise.locks import release_inherited_locks

Batch = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger("layerwise")


class Normalize:
    """uint8 (B, C, H, W) -> float (x/255 - mean)/std, as one fused affine map on the device.

    On a GPU the result is channels_last, the layout the network runs in there.
    """

    def __init__(self, mean: list[float], std: list[float], device: torch.device):
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)
        self.layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale).contiguous(memory_format=self.layout)


@dataclass
class Augmentation:
    """Per-image random crop offsets and flips for one epoch, drawn for the whole dataset at once, then what the
    settings after them ask for (cutout, mixing), each drawn after the others so that they stay as they are.

    Indexing by image (not by batch position) lets a cache of augmented views reproduce an epoch exactly.
    """

    dy: torch.Tensor  # (N,) in [0, 2 * padding]
    dx: torch.Tensor  # (N,)
    flip: torch.Tensor  # (N,) bool
    cy: torch.Tensor | None = None  # (N,) cutout centres in [0, H) (data.cutout), or None
    cx: torch.Tensor | None = None  # (N,) in [0, W)
    partner: torch.Tensor | None = None  # (N,) the image each one is mixed with (data.mix), or None
    lam: torch.Tensor | None = None  # (N,) the image's own share of its mixed image and of its target
    box: torch.Tensor | None = None  # (N, 4) cutmix: rows [top, bottom) and columns [left, right) pasted in

    @staticmethod
    def draw(
        n: int,
        padding: int,
        generator: torch.Generator,
        cutout: int = 0,
        size: tuple[int, int] = (0, 0),
        mix: str = "none",
        alpha: float = 1.0,
    ) -> Augmentation:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        aug = Augmentation(dy, dx, flip)
        if cutout:  # drawn after the crops and flips, so that those stay what they are without cutout
            aug.cy = torch.randint(0, size[0], (n,), generator=generator)
            aug.cx = torch.randint(0, size[1], (n,), generator=generator)
        if mix != "none":
            aug.partner, aug.lam, aug.box = mixing(n, generator, mix, alpha, size)
        return aug

    def to(self, device: torch.device) -> Augmentation:
        fields = (self.dy, self.dx, self.flip, self.cy, self.cx, self.partner, self.lam, self.box)
        return Augmentation(*(t.to(device) if t is not None else None for t in fields))


def mixing(
    n: int, generator: torch.Generator, mix: str, alpha: float, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """data.mix's draws for n images: each image's partner (a random permutation), its own share lam ~
    Beta(alpha, alpha), and for cutmix (Yun et al. 2019) the partner's box: sides H sqrt(1 - lam) and
    W sqrt(1 - lam) around a uniform centre, clipped at the border, after which lam is 1 - the box's area / HW."""
    partner = torch.randperm(n, generator=generator)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):  # Beta draws from the global CPU stream only: seed it from the plan
        torch.default_generator.manual_seed(seed)  # (torch.manual_seed would reseed the GPUs' streams too)
        lam = torch.distributions.Beta(alpha, alpha).sample((n,))
    if mix == "mixup":
        return partner, lam, None
    h, w = size
    cy = torch.randint(0, h, (n,), generator=generator)
    cx = torch.randint(0, w, (n,), generator=generator)
    half_h = (h * (1 - lam).sqrt() / 2).round().long()
    half_w = (w * (1 - lam).sqrt() / 2).round().long()
    box = torch.stack([cy - half_h, cy + half_h, cx - half_w, cx + half_w], 1)
    box[:, :2] = box[:, :2].clamp(0, h)
    box[:, 2:] = box[:, 2:].clamp(0, w)
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    return partner, 1 - area.float() / (h * w), box


def crop(x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) with zero fill, at per-image offsets (dy, dx)."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    # Gather rows then columns: (B, C, H+2p, W+2p) -> (B, C, H, W+2p) -> (B, C, H, W).
    out = padded.gather(2, rows.expand(b, c, h, w + 2 * padding))
    return out.gather(3, cols.expand(b, c, h, w))


def cut_out(x: torch.Tensor, side: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): a side x side square centred at (cy, cx) set to 0, clipped at the border.
    On normalised images 0 is the data's mean colour."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device)[None, :] - (cy[:, None] - side // 2)  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] - (cx[:, None] - side // 2)  # (B, W)
    inside = ((rows >= 0) & (rows < side))[:, None, :, None] & ((cols >= 0) & (cols < side))[:, None, None, :]
    return x.masked_fill(inside, 0.0)


def in_box(size: torch.Size, box: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) masks, True inside each image's box (top, bottom, left, right), bottom and right excluded."""
    rows = torch.arange(size[0], device=box.device)[None, :]
    cols = torch.arange(size[1], device=box.device)[None, :]
    inside_rows = (rows >= box[:, :1]) & (rows < box[:, 1:2])  # (B, H)
    inside_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # (B, W)
    return inside_rows[:, None, :, None] & inside_cols[:, None, None, :]


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of the images where mask is True."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, padding: int, aug: Augmentation, idx: torch.Tensor) -> torch.Tensor:
    return flip(crop(x, padding, aug.dy[idx], aug.dx[idx]), aug.flip[idx])


class Batching:
    """How an epoch of n training images is cut into global batches, and which part of each is this process's."""

    def __init__(self, n: int, batch_size: int, where: Dist = SINGLE):
        self.n, self.batch_size, self.where = n, batch_size, where

    def __len__(self) -> int:
        """Batches per epoch; a last batch with fewer images than processes is dropped."""
        return self.n // self.batch_size + (self.n % self.batch_size >= self.where.world_size)

    def global_batch(self, i: int) -> int:
        """Images in global batch i, over every process."""
        return min(self.batch_size, self.n - i * self.batch_size)

    def shares(self, order: torch.Tensor) -> Iterator[torch.Tensor]:
        """This process's indices of each global batch of `order` (a permutation of the n images)."""
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield idx.tensor_split(self.where.world_size)[self.where.rank] if self.where.active else idx


@runtime_checkable
class Loader(Protocol):
    """What training and evaluation read from any loader (MemoryLoader, StreamLoader, train.cache.PrefixCache):
    normalised batches of the input of block `offset` (0: the images) on `device`, this process's share of each
    global batch, in an order that depends only on `batches`' arguments."""

    offset: int
    device: torch.device

    def __len__(self) -> int: ...

    def global_batch(self, i: int) -> int: ...

    @property
    def num_examples(self) -> int: ...

    def batches(self, seed: int = 0, epoch: int = 0) -> Iterator[Batch]: ...


class Batched:
    """What every loader shares: an epoch cut into global batches by `self.batching` (a Batching)."""

    offset = 0
    batching: Batching

    def __len__(self) -> int:
        return len(self.batching)

    def global_batch(self, i: int) -> int:
        """Images in global batch i, over every process."""
        return self.batching.global_batch(i)

    @property
    def num_examples(self) -> int:
        return self.batching.n


def shard(examples: Examples, where: Dist) -> Examples:
    """Every world_size-th example from this process's rank on: the processes' shards cover each example once."""
    if not where.active:
        return examples
    return examples.subset(torch.arange(where.rank, len(examples), where.world_size))


class MemoryLoader(Batched):
    """Batches of a decoded dataset held on the device (a Loader)."""

    def __init__(
        self,
        data: Decoded,
        batch_size: int,
        device: torch.device,
        cfg: DataConfig,
        train: bool,
        where: Dist = SINGLE,
        classes: int = 0,
    ):
        self.images = to_channels(data.images, len(cfg.mean)).to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.batching = Batching(len(data), batch_size, where if train else SINGLE)
        self.padding, self.cutout = cfg.crop_padding, cfg.cutout
        self.mix, self.alpha, self.classes, self.flip = cfg.mix, cfg.mix_alpha, classes, cfg.flip
        if train and self.mix != "none" and classes < 2:
            raise LayerwiseError("data.mix needs the number of classes (MemoryLoader's classes) for its targets")
        self.normalize = Normalize(cfg.mean, cfg.std, device)

    def epoch_plan(self, seed: int, epoch: int = 0) -> tuple[torch.Tensor, Augmentation]:
        """Epoch `epoch`'s image order and per-image augmentation (on the CPU, so every device sees the same
        batches and a run can resume on another device). data.flip=alternate replaces the random flips (still
        drawn, so that the later draws stay as they are) by image i mirrored where i + epoch is odd."""
        g = torch.Generator().manual_seed(seed)
        n = len(self.labels)
        order = torch.randperm(n, generator=g)
        aug = Augmentation.draw(n, self.padding, g, self.cutout, tuple(self.images.shape[-2:]), self.mix, self.alpha)
        if self.flip == "alternate":
            aug.flip = (torch.arange(n) + epoch) % 2 == 1
        return order, aug

    def augmented(self, idx: torch.Tensor, aug: Augmentation) -> torch.Tensor:
        """Training images idx cropped, flipped, normalised, then cut out."""
        x = self.normalize(augment(self.images[idx], self.padding, aug, idx))
        if not self.cutout:
            return x
        return cut_out(x, self.cutout, aug.cy[idx], aug.cx[idx]).contiguous(memory_format=self.normalize.layout)

    def view(self, idx: torch.Tensor, aug: Augmentation) -> torch.Tensor:
        """Training images idx as the epoch's augmentation makes them: each one augmented, then (data.mix) mixed
        with its partner, augmented as that image is in its own place."""
        x = self.augmented(idx, aug)
        if aug.partner is None:
            return x
        other = self.augmented(aug.partner[idx], aug)
        if aug.box is None:  # mixup
            return torch.lerp(other, x, aug.lam[idx].view(-1, 1, 1, 1).to(x.dtype))
        return torch.where(in_box(x.shape[-2:], aug.box[idx]), other, x)

    def targets(self, idx: torch.Tensor, aug: Augmentation) -> torch.Tensor:
        """The labels of training images idx; with data.mix, (B, classes) class probabilities: lam on the image's
        label and 1 - lam on its partner's."""
        y = self.labels[idx]
        if aug.partner is None:
            return y
        own = F.one_hot(y, self.classes).float()
        other = F.one_hot(self.labels[aug.partner[idx]], self.classes).float()
        return torch.lerp(other, own, aug.lam[idx, None])

    def batches(self, seed: int = 0, epoch: int = 0) -> Iterator[Batch]:
        n = len(self.labels)
        if not self.train:
            for start in range(0, n, self.batch_size):
                yield (
                    self.normalize(self.images[start : start + self.batch_size]),
                    self.labels[start : start + self.batch_size],
                )
            return
        order, aug = self.epoch_plan(seed, epoch)
        order, aug = order.to(self.device), aug.to(self.device)
        for idx in self.batching.shares(order):
            yield self.view(idx, aug), self.targets(idx, aug)


class FileDataset(Dataset):
    """Image files decoded with torchvision.io and transformed to uint8 crops in the worker."""

    def __init__(self, files: Files, transform: v2.Transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image(self.files.paths[i])), self.files.labels[i]


def imagenet_transform(cfg: DataConfig, train: bool) -> v2.Transform:
    gray = [v2.Grayscale(1)] if len(cfg.mean) == 1 else []
    if train:
        return v2.Compose([*gray, v2.RandomResizedCrop(cfg.image_size, antialias=True), v2.RandomHorizontalFlip()])
    return v2.Compose([*gray, v2.Resize(cfg.resize_size, antialias=True), v2.CenterCrop(cfg.image_size)])


def to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 images (..., 3, H, W) as decoded, with the run's number of channels (model.in_channels, which
    data.mean has values for): 1 is torchvision's grayscale (ITU-R 601-2 luma), 3 leaves them as they are."""
    if channels == 1 and images.shape[-3] == 3:
        return v2.functional.rgb_to_grayscale(images)
    return images


def usable_workers(asked: int) -> int:
    """data.workers, lowered (with a warning) to the CPUs this process may run on: more workers than CPUs only
    cost memory. The random crops of streamed data depend on the worker count, so say so."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if asked <= cpus:
        return asked
    log.warning(
        "data.workers=%d is more than the %d CPUs here: using %d (streamed crops differ from a run with %d workers)",
        asked, cpus, cpus, asked,
    )  # fmt: skip
    return cpus


class StreamLoader(Batched):
    """A DataLoader over files with worker processes and pinned memory, normalising on the device (a Loader).

    Workers are started afresh each epoch so that each epoch's crops depend only on its seed (exact resume).
    """

    def __init__(
        self, files: Files, batch_size: int, device: torch.device, cfg: DataConfig, train: bool, where: Dist = SINGLE
    ):
        self.dataset = FileDataset(files, imagenet_transform(cfg, train))
        self.batch_size, self.device, self.train, self.workers = batch_size, device, train, usable_workers(cfg.workers)
        self.batching = Batching(len(files), batch_size, where if train else SINGLE)
        self.rank = where.rank
        self.normalize = Normalize(cfg.mean, cfg.std, device)

    def batches(self, seed: int = 0, epoch: int = 0) -> Iterator[Batch]:
        """The epoch's batches (this process's share of each); the order depends only on `seed`, the random crops
        also on the rank, so that processes do not crop their images alike."""
        n = len(self.dataset)
        order = torch.arange(n)
        if self.train:  # the order DataLoader(shuffle=True, generator=seeded) draws, after its workers' base seed
            g = torch.Generator().manual_seed(seed)
            torch.empty((), dtype=torch.int64).random_(generator=g)
            order = torch.randperm(n, generator=g)
        crops = seed if self.rank == 0 else (seed + 1_000_003 * self.rank) % 2**63  # the workers' base seed
        loader = DataLoader(
            self.dataset,
            batch_sampler=[idx.tolist() for idx in self.batching.shares(order)],
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(crops),
            persistent_workers=False,
            worker_init_fn=release_inherited_locks,
        )
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            yield self.normalize(x), y.to(self.device, non_blocking=True)


def make_loader(
    examples: Examples,
    batch_size: int,
    device: torch.device,
    cfg: DataConfig,
    train: bool,
    where: Dist = SINGLE,
    classes: int = 0,
) -> Loader:
    """A training loader over every example (each process takes its share of each batch), or an evaluation
    loader over this process's shard. `classes` sizes data.mix's targets."""
    examples = examples if train else shard(examples, where)
    if isinstance(examples, Decoded):
        return MemoryLoader(examples, batch_size, device, cfg, train, where, classes)
    return StreamLoader(examples, batch_size, device, cfg, train, where)

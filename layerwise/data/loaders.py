"""Batch iterators. Both kinds yield normalised float batches already on the training device.

`MemoryLoader` keeps small datasets (CIFAR-10: 150 MB as uint8) on the device and augments whole batches
with vectorised ops (the epoch plan of `augment.py`), so no worker process or host->device copy sits in the
training loop. `StreamLoader`
decodes files in DataLoader workers (ImageNet) and ships uint8 crops, normalised only after the copy.
Randomness comes from a generator seeded per epoch, so a resumed run sees exactly the batches it would have.

Under torchrun (`Dist`) `batch_size` is the global batch: every process draws the same epoch plan, cuts the
same global batches and takes its own contiguous share of each, so the processes together see exactly the
batches one process would. The last batch of an epoch is split as evenly as `tensor_split` makes it (shares
differ by at most one image); it is dropped only when it holds fewer images than there are processes.
Evaluation loaders hold their process's part of the images (`part`), so each image is scored exactly once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from layerwise.config import DataConfig
from layerwise.data.augment import Augmentation, EpochPlan
from layerwise.data.images import read_image
from layerwise.data.sources import Decoded, Files
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

    def epoch_counts(self) -> dict[str, int]: ...


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

    def epoch_counts(self) -> dict[str, int]:
        """What the last epoch's images held beyond the data's own (shard_loader.py's repeats, drops and skipped
        samples), for the metrics; nothing for a loader that shows each image once."""
        return {}


@dataclass(frozen=True)
class Feed:
    """How a loader serves its examples: in batches of `batch_size` on `device`; for training (`train`) shuffled
    and augmented, each of `where`'s processes taking its share of each batch; `classes` sizes data.mix's
    targets."""

    batch_size: int
    device: torch.device
    train: bool = False
    where: Dist = SINGLE
    classes: int = 0


class MemoryLoader(Batched):
    """Batches of a decoded dataset held on the device (a Loader)."""

    def __init__(self, data: Decoded, cfg: DataConfig, feed: Feed):
        device, train = feed.device, feed.train
        self.images = to_channels(data.images, len(cfg.mean)).to(device)
        self.labels = data.labels.to(device)
        self.batch_size, self.device, self.train = feed.batch_size, device, train
        self.batching = Batching(len(data), feed.batch_size, feed.where if train else SINGLE)
        size = tuple(self.images.shape[-2:])  # (H, W)
        self.augmentation = Augmentation.from_config(cfg, size, feed.classes) if train else None
        self.normalize = Normalize(cfg.mean, cfg.std, device)

    def epoch_plan(self, seed: int, epoch: int = 0) -> tuple[torch.Tensor, EpochPlan]:
        """Epoch `epoch`'s image order and per-image augmentation, drawn on the CPU from one generator seeded with
        `seed` (so every device sees the same batches and a run can resume on another device)."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.labels), generator=g)
        return order, self.augmentation.draw(len(self.labels), g, epoch)

    def batches(self, seed: int = 0, epoch: int = 0) -> Iterator[Batch]:
        n = len(self.labels)
        if not self.train:
            for start in range(0, n, self.batch_size):
                yield (
                    self.normalize(self.images[start : start + self.batch_size]),
                    self.labels[start : start + self.batch_size],
                )
            return
        order, plan = self.epoch_plan(seed, epoch)
        order, plan = order.to(self.device), plan.to(self.device)
        for idx in self.batching.shares(order):
            yield plan.view(self.images, idx, self.normalize), plan.targets(self.labels, idx)


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
    cost memory. Streamed batches depend on the worker count (a folder's crops, shards' order), so say so."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if asked <= cpus:
        return asked
    log.warning(
        "data.workers=%d is more than the %d CPUs here: using %d (streamed batches differ from a run with %d workers)",
        asked, cpus, cpus, asked,
    )  # fmt: skip
    return cpus


class StreamLoader(Batched):
    """A DataLoader over files with worker processes and pinned memory, normalising on the device (a Loader).

    Workers are started afresh each epoch so that each epoch's crops depend only on its seed (exact resume).
    """

    def __init__(self, files: Files, cfg: DataConfig, feed: Feed):
        shard_settings = {"data.decode": (cfg.decode, DataConfig.decode),
                          "data.shuffle_buffer": (cfg.shuffle_buffer, DataConfig.shuffle_buffer),
                          "data.corrupt": (cfg.corrupt, DataConfig.corrupt)}  # fmt: skip
        for key, (value, default) in shard_settings.items():
            if value != default:
                raise LayerwiseError(f"{key}={value} is for shards (layerwise shard), not an image folder: remove it")
        device, train = feed.device, feed.train
        self.dataset = FileDataset(files, imagenet_transform(cfg, train))
        self.batch_size, self.device, self.train = feed.batch_size, device, train
        self.workers = usable_workers(cfg.workers)
        self.batching = Batching(len(files), feed.batch_size, feed.where if train else SINGLE)
        self.rank = feed.where.rank
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

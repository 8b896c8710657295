"""Data: sources (CIFAR-10 archives, image folders, the built-in sample), the held-out split and loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from layerwise.config import DataConfig
from layerwise.data.loaders import Feed, Loader, MemoryLoader, StreamLoader
from layerwise.data.shard_loader import ShardLoader, Shards, is_shard_spec, open_eval_shards, open_train_shards
from layerwise.data.sources import Decoded, Examples, Files, TrainSource, open_eval, open_train, sample_path
from layerwise.distributed import SINGLE, Dist
from layerwise.errors import LayerwiseError

__all__ = ["DataBundle", "Decoded", "Files", "Shards", "build_data", "build_eval_loader", "hold_out", "sample_path"]

LOADERS = {Decoded: MemoryLoader, Files: StreamLoader, Shards: ShardLoader}
"""Each kind of examples' loader."""


@dataclass
class DataBundle:
    classes: list[str]
    train: Loader
    val: Loader | None  # None: no validation (data.val_size=0 and no val_path)
    train_eval: Loader | None  # a fixed subset of the training images, scored without augmentation
    description: str
    val_images: int  # over every process (under DDP, `val` holds this process's shard)


def hold_out(examples: Examples, val_size: float, seed: int) -> tuple[Examples, Examples]:
    """Split off a seeded validation set: val_size images, or that fraction of them when below 1."""
    n = len(examples)
    n_val = int(val_size) if val_size >= 1 else round(val_size * n)
    if not 1 <= n_val < n:
        raise LayerwiseError(f"data.val_size={val_size:g} leaves no training or validation images out of {n}; lower it")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return examples.subset(order[n_val:]), examples.subset(order[:n_val])


def build_data(
    cfg: DataConfig,
    path: str | Path | None,
    batch_size: int,
    device: torch.device,
    train_eval_size: int = 0,
    where: Dist = SINGLE,
) -> DataBundle:
    """Open the data at path (None: the built-in sample), hold out validation if needed, and make loaders
    (under DDP, loaders of this process's shares: see layerwise.data.loaders)."""
    decode = cfg.augment == "cifar"
    source = open_train_data(path, decode, cfg.image_size)
    train, val = source.train, source.val
    description = source.description
    # One rule: data.val_path, else the source's own validation split, else a held-out split, else none.
    if cfg.val_path is not None:
        val = open_eval_data(cfg.val_path, decode, cfg.image_size, source.classes)
        description += f", validation on {cfg.val_path} ({len(val)} images)"
    elif val is None and cfg.val_size > 0:
        train, val = hold_out(train, cfg.val_size, cfg.split_seed)
        description += f", {len(val)} images held out for validation (seed {cfg.split_seed})"
    elif val is None:
        description += ", no validation (data.val_size=0): training figures only"
    train_eval = None
    # each process scores its shard in its share of a batch
    scoring = Feed(max(1, batch_size // where.world_size), device, train=False, where=where)
    if train_eval_size:
        train_eval = make_loader(train.fixed(train_eval_size, cfg.split_seed + 1), cfg, scoring)
    return DataBundle(
        classes=source.classes,
        train=make_loader(train, cfg, Feed(batch_size, device, True, where, len(source.classes))),
        val=make_loader(val, cfg, scoring) if val is not None else None,
        train_eval=train_eval,
        description=description,
        val_images=len(val) if val is not None else 0,
    )


def build_eval_loader(
    cfg: DataConfig, path: str | Path, classes: list[str], batch_size: int, device: torch.device
) -> Loader:
    examples = open_eval_data(path, cfg.augment == "cifar", cfg.image_size, classes)
    return make_loader(examples, cfg, Feed(batch_size, device))


def open_train_data(path: str | Path | None, decode: bool, size: int) -> TrainSource:
    """The training source at `path`: shards (a folder with index.json, a brace pattern or a .txt list), or
    anything else open_train reads."""
    return (open_train_shards if is_shard_spec(path) else open_train)(path, decode, size)


def open_eval_data(path: str | Path, decode: bool, size: int, classes: list[str]) -> Examples:
    return (open_eval_shards if is_shard_spec(path) else open_eval)(path, decode, size, classes)


def make_loader(examples: Examples, cfg: DataConfig, feed: Feed) -> Loader:
    """A training loader over every example (each process takes its share of each batch), or an evaluation
    loader over this process's part."""
    return LOADERS[type(examples)](examples if feed.train else examples.part(feed.where), cfg, feed)

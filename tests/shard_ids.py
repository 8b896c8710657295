"""Shards of solid-colour images whose colour is the image's number, and the numbers a ShardLoader yields: any crop
or resize of a solid image keeps its colour, so a batch says which images it holds. Run under torchrun
(`python -m torch.distributed.run ... tests/shard_ids.py SHARDS OUT`), each process writes the numbers of its
training batches (two epochs) and of its evaluation batches to OUT/rank{r}.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torchvision.io import encode_png

from layerwise.config import DataConfig
from layerwise.data import build_data
from layerwise.data.loaders import Loader
from layerwise.distributed import SINGLE, Dist, from_env

CLASSES = ("a", "b", "c")
SIDE = 4
"""The crop's side; the images are 8x8."""


def write_solid(root: Path, split: str, numbers: range) -> None:
    """Image n (8x8 PNG of colour (n % 256, n // 256, 7)) in class folder CLASSES[n % 3]."""
    for n in numbers:
        folder = root / split / CLASSES[n % 3]
        folder.mkdir(parents=True, exist_ok=True)
        image = torch.tensor([n % 256, n // 256, 7], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8).contiguous()
        (folder / f"{n:04d}.png").write_bytes(bytes(encode_png(image).numpy()))


def config(workers: int = 2, **more) -> DataConfig:
    """Streamed (imagenet) data that leaves the colours as they are: mean 0, std 1, crops of SIDE (unless `more`
    says otherwise)."""
    given = {"image_size": SIDE, "resize_size": SIDE, **more}
    return DataConfig(augment="imagenet", mean=[0.0] * 3, std=[1.0] * 3, workers=workers, **given)


def numbers(x: torch.Tensor) -> list[int]:
    """The image numbers of a normalised batch (mean 0, std 1: x = colour / 255)."""
    colour = (x[:, :2, 0, 0] * 255).round().long()  # (B, 2): red, green
    assert torch.equal(x, x[:, :, :1, :1].expand_as(x)), "a solid image came back with more than one colour"
    return (colour[:, 0] + 256 * colour[:, 1]).tolist()


def seen(loader: Loader, seed: int = 0, epoch: int = 0) -> list[list[int]]:
    """Each batch's image numbers, checking that the labels are theirs."""
    out = []
    for x, y in loader.batches(seed, epoch):
        got = numbers(x)
        assert y.tolist() == [n % 3 for n in got]
        out.append(got)
    return out


def main(shards: str, out: str, batch: int) -> None:
    where = from_env()
    bundle = build_data(config(), shards, batch, torch.device("cpu"), where=where if where.active else SINGLE)
    record = {
        "train": [seen(bundle.train, seed=11, epoch=e) for e in range(2)],
        "counts": bundle.train.epoch_counts(),
        "val": seen(bundle.val),
    }
    Path(out, f"rank{where.rank}.json").write_text(json.dumps(record))


def where_of(rank: int, world: int) -> Dist:
    return Dist(rank, world) if world > 1 else SINGLE


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

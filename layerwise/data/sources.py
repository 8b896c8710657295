"""Finding and reading datasets: CIFAR-10 python archives, ImageFolder trees (or archives of them), ImageNet layout.

Every source ends up as an `Examples`: either images decoded into one uint8 tensor (small images, kept in
memory or on the GPU) or a list of files streamed by a DataLoader (ImageNet-sized data).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

from layerwise.data.cifar import is_cifar_python, read_cifar_python, reading_archive
from layerwise.data.images import IMAGE_EXTENSIONS, decode_bytes, read_image
from layerwise.distributed import Dist
from layerwise.errors import LayerwiseError
from layerwise.limits import Budget

SPLITS = ("train", "val", "test")
SAMPLE = "cifar10-sample.tar.gz"


@dataclass
class Decoded:
    """Images decoded once: (N, C, H, W) uint8 and (N,) int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Decoded:
        return Decoded(self.images[index], self.labels[index])

    def fixed(self, k: int, seed: int) -> Decoded:
        return self.subset(fixed_order(len(self), seed)[:k])

    def part(self, where: Dist) -> Decoded:
        return self.subset(part_of(len(self), where))


@dataclass
class Files:
    """Image files on disk, decoded on the fly by DataLoader workers."""

    paths: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> Files:
        return Files([self.paths[i] for i in index.tolist()], [self.labels[i] for i in index.tolist()])

    def fixed(self, k: int, seed: int) -> Files:
        return self.subset(fixed_order(len(self), seed)[:k])

    def part(self, where: Dist) -> Files:
        return self.subset(part_of(len(self), where))


def fixed_order(n: int, seed: int) -> torch.Tensor:
    """A seeded order of n examples, whose first k are a fixed subset (`fixed(k, seed)`)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def part_of(n: int, where: Dist) -> torch.Tensor:
    """Every world_size-th of n examples from this process's rank on (`part`): the processes' parts cover each
    example once."""
    return torch.arange(where.rank, n, where.world_size)


Examples = Decoded | Files
"""(shard_loader.Shards is the third kind; data/__init__.py's LOADERS gives each its loader.)"""


@dataclass
class Record:
    """One image of an ImageFolder tree: where it is, its split folder (or ''), its class folder."""

    name: str
    split: str
    label: str
    data: bytes | None = None  # the encoded file when it came from an archive


def sample_path() -> Path:
    """The built-in sample: a few thousand CIFAR-10 training images as JPEG, in ImageFolder layout."""
    return Path(str(resources.files("layerwise.data").joinpath("sample", SAMPLE)))


def check_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise LayerwiseError(f"data path {path} does not exist; pass --data with an image folder or a CIFAR-10 archive")
    if path.is_dir() and not any(path.iterdir()):
        raise LayerwiseError(f"data folder {path} is empty; point --data at a folder with one subfolder per class")
    return path


# ---------------------------------------------------------------- ImageFolder trees and archives of them


def _classify(parts: tuple[str, ...], where: str) -> tuple[str, str]:
    """(split, class) of a file from its path parts below the dataset root."""
    if len(parts) == 2:
        return "", parts[0]
    if len(parts) == 3 and parts[0] in SPLITS:
        return parts[0], parts[1]
    if len(parts) == 1:
        raise LayerwiseError(
            f"{where} holds images directly, with no class subfolders; arrange it as <root>/<class>/<image>"
        )
    raise LayerwiseError(
        f"{where}: unexpected folder depth at {'/'.join(parts)}; "
        "use <root>/<class>/<image> or <root>/train|val/<class>/<image>"
    )


def _check_image_name(name: str) -> bool:
    """True for an image file, False for a hidden file to skip; raises for anything else."""
    base = os.path.basename(name)
    if base.startswith("."):
        return False
    if not base.lower().endswith(IMAGE_EXTENSIONS):
        raise LayerwiseError(
            f"{name} is not an image (expected {', '.join(IMAGE_EXTENSIONS)}); remove it from the data"
        )
    return True


def _records_from_dir(root: Path) -> list[Record]:
    records = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if not _check_image_name(full):
                continue
            split, label = _classify(Path(os.path.relpath(full, root)).parts, str(root))
            records.append(Record(full, split, label))
    return records


def _hidden(name: str) -> bool:
    """A hidden file or a file in a hidden folder (.DS_Store, ._0.jpg, .ipynb_checkpoints/cat/0.jpg)."""
    return any(part.startswith(".") for part in Path(name).parts)


def _records_from_archive(path: Path) -> list[Record]:
    budget = Budget(path)
    files = []
    with reading_archive(path), tarfile.open(path) as tf:
        for member in tf:
            if member.isfile() and not _hidden(member.name):
                _check_image_name(member.name)  # raises for a non-image before its bytes are read
                budget.take(f"{path}:{member.name}", member.size)
                files.append((member, tf.extractfile(member).read()))
    names = [m.name for m, _ in files]
    # Strip one common top folder (cifar10-jpeg/train/cat/0.jpg -> train/cat/0.jpg).
    tops = {Path(n).parts[0] for n in names}
    strip = 1 if len(tops) == 1 and all(len(Path(n).parts) >= 3 for n in names) else 0
    records = []
    for member, data in files:
        parts = Path(member.name).parts[strip:]
        split, label = _classify(parts, str(path))
        records.append(Record(f"{path}:{member.name}", split, label, data))
    return records


def _decode(records: list[Record], size: int | None, desc: str) -> torch.Tensor:
    """Decode every record into one (N, 3, H, W) uint8 tensor; all images must share one size."""
    images, first = [], None
    for r in tqdm(records, desc=desc, unit="img", leave=False, disable=None, mininterval=1.0):
        img = decode_bytes(r.data, r.name) if r.data is not None else read_image(r.name)
        if first is None:
            first = (r.name, tuple(img.shape[1:]))
            if size is not None and first[1] != (size, size):
                raise LayerwiseError(
                    f"{r.name} is {first[1][1]}x{first[1][0]} but data.image_size is {size}; "
                    "set data.image_size to match or use data.augment=imagenet for resized images"
                )
        elif tuple(img.shape[1:]) != first[1]:
            raise LayerwiseError(
                f"{r.name} is {img.shape[2]}x{img.shape[1]} but {first[0]} is {first[1][1]}x{first[1][0]}; "
                "in-memory (cifar) data needs one image size: resize them or use data.augment=imagenet"
            )
        images.append(img)
    return torch.stack(images)


def to_examples(records: list[Record], classes: list[str], decode: bool, size: int, desc: str) -> Examples:
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[r.label] for r in records]
    if decode:
        return Decoded(_decode(records, size, desc), torch.tensor(labels, dtype=torch.int64))
    if any(r.data is not None for r in records):
        raise LayerwiseError("streamed (imagenet) data must be a folder; extract the archive first")
    return Files([r.name for r in records], labels)


def _cifar_examples(path: Path, train: bool) -> tuple[list[str], Decoded]:
    classes, images, labels = read_cifar_python(path, train)
    return classes, Decoded(images, labels)


def image_records(path: Path) -> list[Record]:
    """Every image of an ImageFolder tree or its archive, with its split and class folder."""
    records = _records_from_dir(path) if path.is_dir() else _records_from_archive(path)
    if not records:
        raise LayerwiseError(f"no images found in {path}; expected <root>/<class>/<image> folders")
    return records


# ---------------------------------------------------------------- entry points


@dataclass
class TrainSource:
    classes: list[str]
    train: Examples
    val: Examples | None  # None: the source has no validation split, hold one out of train
    description: str


def open_train(path: str | Path | None, decode: bool, size: int) -> TrainSource:
    """The training data (and validation split if the source has one) found at path, or the built-in sample."""
    path = sample_path() if path is None else check_path(path)
    if is_cifar_python(path):
        if not decode:
            raise LayerwiseError("a CIFAR-10 python archive needs data.augment=cifar")
        classes, train = _cifar_examples(path, train=True)
        return TrainSource(classes, train, None, f"CIFAR-10 python archive {path}")
    records = image_records(path)
    splits = {r.split for r in records}
    if "train" in splits:
        train_records = [r for r in records if r.split == "train"]
        val_records = [r for r in records if r.split == "val"]
    elif splits == {""}:
        train_records, val_records = records, []
    else:
        raise LayerwiseError(f"{path} has {sorted(splits - {''})}/ but no train/ folder; add train/<class>/<image>")
    classes = sorted({r.label for r in train_records})
    if len(classes) < 2:
        raise LayerwiseError(f"{path} has {len(classes)} class folder(s); a classifier needs at least 2")
    unknown = sorted({r.label for r in val_records} - set(classes))
    if unknown:
        raise LayerwiseError(f"val/ class folder {unknown[0]!r} is not among the train/ classes; rename or remove it")
    train = to_examples(train_records, classes, decode, size, "decoding train")
    val = to_examples(val_records, classes, decode, size, "decoding val") if val_records else None
    return TrainSource(classes, train, val, f"image folder {path}")


def open_eval(path: str | Path, decode: bool, size: int, classes: list[str]) -> Examples:
    """Held-out data to evaluate on, labelled with a run's class list by class name.

    A CIFAR-10 archive gives its test_batch; a tree with val/ or test/ gives that split; a plain
    ImageFolder gives all its images.
    """
    path = check_path(path)
    if is_cifar_python(path):
        src_classes, data = _cifar_examples(path, train=False)
        remap = torch.tensor([class_index(classes, c, path) for c in src_classes])
        return Decoded(data.images, remap[data.labels])
    records = image_records(path)
    splits = {r.split for r in records}
    chosen = next((s for s in ("test", "val") if s in splits), None)
    if chosen is not None:
        records = [r for r in records if r.split == chosen]
    elif splits != {""}:
        raise LayerwiseError(f"{path} has only a train/ split; evaluate on data no one trained on (val/ or test/)")
    for label in sorted({r.label for r in records}):
        class_index(classes, label, path)
    return to_examples(records, classes, decode, size, "decoding eval")


def class_index(classes: list[str], label: str, path: Path) -> int:
    if label not in classes:
        raise LayerwiseError(
            f"class {label!r} in {path} is not one the run was trained on ({', '.join(classes[:10])}...); remove it"
        )
    return classes.index(label)

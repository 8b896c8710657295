"""Tar shards in WebDataset's format, for data on shared filesystems where a million small files are slow to list
and read: `layerwise shard SRC OUT` writes them, `read_shard` streams one back.

Each split's samples are written in a seeded random order (the source lists them class by class), so that every
shard mixes the classes and a split's first samples are a random subset of it. A shard `{split}-{n:06d}.tar`
holds samples one after the other, each two members that share a key: the encoded
image exactly as the source held it (`{key}.jpg`, `.png`, `.webp` or `.gif`) and its class index as text
(`{key}.cls`); the key is the sample's position in its split's order (8 digits). Beside the shards, `classes.json` (the
class names, in label order) and `index.json` (each split's shards with their sample counts and sizes, so every
process knows an epoch's length without reading them). The members carry no owner, time or mode of the source,
so the same source gives byte-identical shards, and a rerun keeps the shards already written (each is written
under a temporary name and renamed when whole) and writes the rest.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from layerwise.data.cifar import is_cifar_python, read_cifar_python
from layerwise.data.sources import Record, check_path, image_records
from layerwise.errors import LayerwiseError
from layerwise.limits import MAX_MEMBER_BYTES, RUN_FILE
from layerwise.safe_io import atomic_write, read_bytes, read_text, write_text

FORMAT = "layerwise-shards/1"
KEY = re.compile(r"(\d{8})\.(jpg|png|webp|gif|cls)")
"""A member's whole name: nothing else is read from a shard, and no name ever reaches the filesystem."""
SPLIT_ORDER = ("train", "val", "test")
BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class Sample:
    """One image to shard: its split, class index, a name for messages, and its encoded bytes (or None, read
    from `name` when written)."""

    split: str
    label: int
    name: str
    ext: str
    size: int
    data: bytes | None = None

    def encoded(self) -> bytes:
        return self.data if self.data is not None else read_bytes(Path(self.name))


def member_bytes(size: int) -> int:
    """A member's room in a tar: its header block and its data padded to whole blocks."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def extension(name: str) -> str:
    ext = Path(name).suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def samples_of(src: Path) -> tuple[list[str], list[Sample]]:
    """The class names and every image of a source `layerwise` reads (an ImageFolder or its archive, the ImageNet
    layout, a CIFAR-10 python archive, whose images are stored as lossless PNG), grouped by split in the order
    the source lists them. A flat ImageFolder is the train split."""
    if is_cifar_python(src):
        from torchvision.io import encode_png

        samples, classes = [], []
        for split, train in (("train", True), ("test", False)):
            classes, images, labels = read_cifar_python(src, train)
            for i, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
                data = encode_png(image).numpy().tobytes()
                samples.append(Sample(split, label, f"{src}:{split}[{i}]", "png", len(data), data))
        return classes, samples
    records = image_records(src)
    named = [r for r in records if (r.split or "train") == "train"]
    classes = sorted({r.label for r in named})
    if len(classes) < 2:
        raise LayerwiseError(f"{src} has {len(classes)} class folder(s) for training; a classifier needs at least 2")
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    for split in SPLIT_ORDER:
        for r in (r for r in records if (r.split or "train") == split):
            if r.label not in index:
                raise LayerwiseError(f"{split}/ class folder {r.label!r} is not among the train/ classes")
            samples.append(sample_of(r, split, index[r.label]))
    return classes, samples


def shuffled(samples: list[Sample], seed: int) -> list[Sample]:
    """Each split's samples (splits in their order) in an order drawn from `seed`."""
    g, out = torch.Generator().manual_seed(seed), []
    for split in dict.fromkeys(s.split for s in samples):
        mine = [s for s in samples if s.split == split]
        out += [mine[i] for i in torch.randperm(len(mine), generator=g).tolist()]
    return out


def sample_of(record: Record, split: str, label: int) -> Sample:
    size = len(record.data) if record.data is not None else Path(record.name).stat().st_size
    return Sample(split, label, record.name, extension(record.name), size, record.data)


def plan(samples: list[Sample], shard_bytes: int) -> dict[str, list[list[int]]]:
    """Each split's shards as lists of sample positions: consecutive samples while the shard stays within
    `shard_bytes` (at least one each)."""
    shards: dict[str, list[list[int]]] = {}
    room = 0
    for i, s in enumerate(samples):
        need = member_bytes(s.size) + member_bytes(len(str(s.label)))
        own = shards.setdefault(s.split, [])
        if not own or room + need > shard_bytes:
            own.append([])
            room = 2 * BLOCK  # the end-of-archive blocks
        own[-1].append(i)
        room += need
    return shards


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def shard_members(path: Path) -> list[tuple[str, int]] | None:
    """The (name, size) of each member of a whole shard on disk, or None where it cannot be read to its end."""
    try:
        with tarfile.open(path, "r:") as tar:
            return [(m.name, m.size) for m in tar.getmembers()]
    except (OSError, tarfile.TarError, EOFError):
        return None


def write_shards(src: str | Path, out: str | Path, shard_bytes: int, seed: int = 0) -> dict:
    """Shard `src` into `out` (see the module's docstring), each split's samples in the order drawn from `seed`;
    returns the index. A shard already in `out` with the planned members (names and sizes) is kept."""
    src, out = check_path(src), Path(out)
    if shard_bytes < 16 * BLOCK:
        raise LayerwiseError(f"--shard-size must be at least {16 * BLOCK} bytes")
    classes, samples = samples_of(src)
    samples = shuffled(samples, seed)
    out.mkdir(parents=True, exist_ok=True)
    layout = plan(samples, shard_bytes)
    index = {"format": FORMAT, "classes": classes, "seed": seed, "splits": {}}
    first = {split: min(i for shard in shards for i in shard) for split, shards in layout.items()}
    bar = tqdm(total=len(samples), desc="sharding", unit="img", disable=None, mininterval=1.0)
    for split, shards in layout.items():
        rows = index["splits"][split] = []
        for n, positions in enumerate(shards):
            name = f"{split}-{n:06d}.tar"
            keys = [f"{i - first[split]:08d}" for i in positions]
            members = [
                member
                for k, i in zip(keys, positions, strict=True)
                for member in ((f"{k}.{samples[i].ext}", samples[i].size), (f"{k}.cls", len(str(samples[i].label))))
            ]
            if shard_members(out / name) != members:

                def write(f, positions=positions, keys=keys) -> None:
                    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                        for key, i in zip(keys, positions, strict=True):
                            add_member(tar, f"{key}.{samples[i].ext}", samples[i].encoded())
                            add_member(tar, f"{key}.cls", str(samples[i].label).encode())

                atomic_write(out / name, write, out)
            rows.append({"name": name, "samples": len(positions), "bytes": (out / name).stat().st_size})
            bar.update(len(positions))
    bar.close()
    write_text(out / "classes.json", json.dumps(classes) + "\n", out)
    write_text(out / "index.json", json.dumps(index, indent=1) + "\n", out)
    return index


def read_index(folder: Path) -> dict:
    """A shard folder's index.json, checked: every split a list of {name, samples, bytes} with plain shard names."""
    try:
        index = json.loads(read_text(folder / "index.json", RUN_FILE))
    except (OSError, ValueError) as e:
        raise LayerwiseError(
            f"{folder / 'index.json'} is unreadable ({type(e).__name__}); run layerwise shard"
        ) from None
    ok = isinstance(index, dict) and index.get("format") == FORMAT and isinstance(index.get("splits"), dict)
    classes = index.get("classes") if ok else None
    ok = ok and isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)
    for rows in index.get("splits", {}).values() if ok else []:
        ok = ok and isinstance(rows, list) and all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and re.fullmatch(r"\w+-\d{6}\.tar", r["name"])
            and isinstance(r.get("samples"), int) and r["samples"] > 0 for r in rows
        )  # fmt: skip
    if not ok:
        raise LayerwiseError(f"{folder / 'index.json'} is not a layerwise shard index ({FORMAT})")
    return index


def read_shard(path: Path, classes: int) -> Iterator[tuple[str, bytes, int]]:
    """(key, encoded image, label) of each sample of one shard, streamed in order: member names are matched whole
    (KEY) and never touch the filesystem, each member's size is checked against LAYERWISE_MAX_MEMBER_BYTES
    before it is read, and a shard that is not a sequence of whole samples is one line naming it and the key."""
    cap = MAX_MEMBER_BYTES.get()
    key, image, label = None, None, None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                found = KEY.fullmatch(member.name)
                if not member.isfile() or found is None:
                    raise LayerwiseError(f"shard {path}: unexpected member {member.name[:80]!r}")
                if member.size > cap:
                    raise LayerwiseError(
                        f"shard {path}: {member.name} is {member.size} bytes, more than {MAX_MEMBER_BYTES.env}"
                    )
                if found[1] != key:
                    if key is not None:
                        raise LayerwiseError(f"shard {path}: sample {key} is incomplete")
                    key = found[1]
                data = tar.extractfile(member).read()
                if found[2] == "cls":
                    text = data.decode("ascii", errors="replace").strip()
                    if not text.isdigit() or int(text) >= classes:
                        raise LayerwiseError(f"shard {path}: sample {key} has no class index below {classes}")
                    label = int(text)
                elif image is None:
                    image = data
                else:
                    raise LayerwiseError(f"shard {path}: sample {key} holds two images")
                if image is not None and label is not None:
                    yield key, image, label
                    key, image, label = None, None, None
    except (OSError, tarfile.TarError, EOFError) as e:
        raise LayerwiseError(f"shard {path} is unreadable after sample {key} ({type(e).__name__})") from None
    if key is not None:
        raise LayerwiseError(f"shard {path}: sample {key} is incomplete")

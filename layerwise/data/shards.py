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

import hashlib
import io
import itertools
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
    """Each split's shards as lists of sample positions: as many shards as filling each up to `shard_bytes` takes
    (at least one sample each), then the split's samples dealt into that many runs of consecutive samples whose
    counts differ by at most one, so that no shard is a small remainder (readers then hold alike)."""
    shards: dict[str, list[list[int]]] = {}
    for split in dict.fromkeys(s.split for s in samples):
        mine = [i for i, s in enumerate(samples) if s.split == split]
        count, room = 0, shard_bytes
        for i in mine:
            need = member_bytes(samples[i].size) + member_bytes(len(str(samples[i].label)))
            if room + need > shard_bytes:
                count, room = count + 1, 2 * BLOCK  # the end-of-archive blocks
            room += need
        bounds = [len(mine) * k // count for k in range(count + 1)]
        shards[split] = [mine[a:b] for a, b in itertools.pairwise(bounds)]
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
    returns the index.

    A rerun keeps a shard that is whole, holds the planned members (names and sizes) and was planned with the same
    sources (`plan.json`: a digest of each shard's source names, sizes and labels, written before any shard). A
    shard whose plan changed is deleted first, so an interrupted rerun cannot keep it. A source file changed in
    place at the same size goes unnoticed: delete the shards to start afresh."""
    src, out = check_path(src), Path(out)
    if shard_bytes < 16 * BLOCK:
        raise LayerwiseError(f"--shard-size must be at least {16 * BLOCK} bytes")
    classes, samples = samples_of(src)
    samples = shuffled(samples, seed)
    out.mkdir(parents=True, exist_ok=True)
    layout = {
        f"{split}-{n:06d}.tar": (split, positions)
        for split, shards in plan(samples, shard_bytes).items()
        for n, positions in enumerate(shards)
    }
    digests = {name: digest(samples, positions) for name, (_, positions) in layout.items()}
    planned = previous_plan(out)
    for name in layout:
        if planned.get(name) != digests[name]:
            (out / name).unlink(missing_ok=True)
    write_text(out / "plan.json", json.dumps(digests, indent=1) + "\n", out)
    index = {"format": FORMAT, "classes": classes, "seed": seed, "splits": {}}
    first = {split: positions[0] for split, positions in reversed(layout.values())}
    bar = tqdm(total=len(samples), desc="sharding", unit="img", disable=None, mininterval=1.0)
    for name, (split, positions) in layout.items():
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
        row = {"name": name, "samples": len(positions), "bytes": (out / name).stat().st_size}
        index["splits"].setdefault(split, []).append(row)
        bar.update(len(positions))
    bar.close()
    write_text(out / "classes.json", json.dumps(classes) + "\n", out)
    write_text(out / "index.json", json.dumps(index, indent=1) + "\n", out)
    return index


def digest(samples: list[Sample], positions: list[int]) -> str:
    lines = "\n".join(f"{samples[i].name}\t{samples[i].size}\t{samples[i].label}" for i in positions)
    return hashlib.sha256(lines.encode()).hexdigest()


def previous_plan(out: Path) -> dict[str, str]:
    """The digests of an earlier run's plan.json, or none where it is missing or not ours."""
    try:
        found = json.loads(read_text(out / "plan.json", RUN_FILE))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


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
    names = [r["name"] for rows in index["splits"].values() for r in rows] if ok else []
    if not ok or len(set(names)) != len(names):
        raise LayerwiseError(f"{folder / 'index.json'} is not a layerwise shard index ({FORMAT})")
    return index


class PlainMember(tarfile.TarInfo):
    """A tar header that refuses the extended ones (pax, GNU long names, sparse files): tarfile would read their
    whole body into memory before any member is seen, and `layerwise shard` writes none."""

    def _proc_member(self, tarfile_: tarfile.TarFile):
        if self.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE):
            raise tarfile.HeaderError(f"an extended or special header ({self.type!r})")
        return super()._proc_member(tarfile_)


def read_shard(path: Path, classes: int) -> Iterator[tuple[str, bytes, int]]:
    """(key, encoded image, label) of each sample of one shard, streamed in order: member names are matched whole
    (KEY) and never touch the filesystem, each member's size is checked against LAYERWISE_MAX_MEMBER_BYTES
    before it is read, and a shard that is not a sequence of whole samples is one line naming it and the key."""
    cap = MAX_MEMBER_BYTES.get()
    key, image, label = None, None, None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|", tarinfo=PlainMember) as tar:
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
        raise LayerwiseError(f"shard {path} is unreadable after sample {key} ({type(e).__name__}: {e})") from None
    if key is not None:
        raise LayerwiseError(f"shard {path}: sample {key} is incomplete")

"""Training and evaluating from tar shards (`layerwise shard`'s format, see shards.py): `--data` names a shard
folder (its index.json beside the shards), a brace pattern (`shards/train-{000000..000099}.tar`) or a list file
(`.txt`, one shard per line), and each process and DataLoader worker reads shards of its own, start to end.

An epoch of training, under P processes with W readers each (data.workers, at least 1):
- the shards are shuffled (a generator seeded with the epoch's seed) and dealt, one at a time, to whichever of
  the P x W readers holds the fewest samples so far; every process draws the same deal;
- the epoch is cut into global batches as the in-memory and file loaders cut it (`Batching`: the same number of
  steps at any P), so process p must deliver exactly its shares, L_p images. A process whose shards hold more
  drops its last samples; one whose shards hold fewer reads its shards again from the start (repeats). A deal
  that would leave a process less than half its shares is refused, so no image is shown more than twice in an
  epoch; `epoch_counts` says how many were repeated and dropped (the metrics and summary carry it). Over the
  processes the epoch is the dataset's size, less a last batch smaller than P (which every loader drops), so the
  drops and repeats are equal in number but for those;
- a reader passes its samples through a shuffle buffer (data.shuffle_buffer encoded images, a generator seeded
  with the epoch's seed, the process and the reader) before decoding them;
- a sample's random crop and flip are drawn from a seed of the epoch's seed and the sample's position in the
  dataset alone, so the same image gets the same crop however many processes or workers read it.

The epoch is reproducible for the same P and W, however many DataLoader processes run the readers (data.workers
is lowered to the CPUs there are; `in_reader_order` puts the chunks in the readers' order): a run resumes exactly
at an epoch boundary. It also resumes on another P or W, with the same images, drops and repeats
aside, in another order. Evaluation deals the shards in their order to the processes' readers and reads each
sample once, without drops or repeats (`evaluate` sums the processes' counts). A sample that cannot be decoded
is fatal, one line naming the shard and key, or with data.corrupt=skip, a warning, replaced by the reader's next
sample (not in evaluation, which scores the others), and counted (once an epoch).
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import logging
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from layerwise.config import DataConfig
from layerwise.data.decoding import Decoding, decoding_for
from layerwise.data.loaders import Batch, Batched, Batching, Feed, Normalize, imagenet_transform, usable_workers
from layerwise.data.shards import FORMAT, read_index, read_shard
from layerwise.data.sources import Decoded, Record, TrainSource, class_index, to_examples
from layerwise.distributed import SINGLE, Dist
from layerwise.errors import LayerwiseError, one_line
from layerwise.limits import MAX_BUFFER_BYTES, RUN_FILE, Budget
from layerwise.locks import release_inherited_locks
from layerwise.safe_io import read_text

log = logging.getLogger("layerwise")
RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
MAX_SHARDS = 1_000_000


@dataclass(frozen=True)
class Shard:
    """One shard to read: its file, how many samples to read from its start, and the dataset position of its
    first sample (the key of a sample's crop seed)."""

    path: Path
    samples: int
    first: int


@dataclass(frozen=True)
class Shards:
    """Shards streamed by DataLoader workers (an Examples kind, beside Decoded and Files). `labels` maps the
    shards' class indices to the run's."""

    shards: tuple[Shard, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return sum(s.samples for s in self.shards)

    def subset(self, index: torch.Tensor) -> Shards:
        raise LayerwiseError(
            "sharded data is read shard by shard and cannot hold out random images for validation: shard a source "
            "with a val/ split, pass data.val_path, or set data.val_size=0"
        )

    def fixed(self, k: int, seed: int) -> Shards:
        """The first k samples (a fixed subset read from the first shards alone; `seed` is not needed)."""
        kept, left = [], k
        for s in self.shards:
            if left <= 0:
                break
            kept.append(replace(s, samples=min(s.samples, left)))
            left -= kept[-1].samples
        return Shards(tuple(kept), self.labels)

    def part(self, where: Dist) -> Shards:
        """This process's shards for evaluation, dealt in order to the least loaded process."""
        if not where.active:
            return self
        return Shards(tuple(deal(list(self.shards), where.world_size)[where.rank]), self.labels)


def deal(shards: list[Shard], readers: int) -> list[list[Shard]]:
    """Each shard, in the order given, to the reader holding the fewest samples so far (the first on ties)."""
    held, loads = [[] for _ in range(readers)], [(0, r) for r in range(readers)]
    for s in shards:
        load, r = heapq.heappop(loads)
        held[r].append(s)
        heapq.heappush(loads, (load + s.samples, r))
    return held


def shares(batching: Batching, where: Dist) -> list[int]:
    """This process's images in each global batch: tensor_split's sizes (the first `size % P` get one more)."""
    world, rank = where.world_size, where.rank
    return [g // world + (rank < g % world) for g in (batching.global_batch(i) for i in range(len(batching)))]


def quotas(held: list[int], need: int) -> list[int]:
    """How many samples each reader delivers so that their total is `need`: the readers' samples taken as one
    stream (reader 0's, then reader 1's, ...) cut at `need`, or repeated from its start up to `need`."""
    total = sum(held)
    rounds, rest = divmod(need, total)
    out, start = [], 0
    for n in held:
        out.append(rounds * n + min(max(rest - start, 0), n))
        start += n
    return out


@dataclass(frozen=True)
class Reader:
    """One reader's part of an epoch: its shards in order and how many samples it delivers (None: each once)."""

    shards: tuple[Shard, ...]
    quota: int | None


@dataclass(frozen=True)
class EpochPlan:
    """This process's readers for one epoch, and its repeats and drops (train) against its shards."""

    readers: tuple[Reader, ...]
    repeated: int = 0
    dropped: int = 0


def train_plan(shards: Shards, readers: int, batching: Batching, where: Dist, seed: int) -> EpochPlan:
    """The epoch's deal (see the module's docstring): the same on every process, this process's part of it."""
    slots = where.world_size * readers
    order = torch.randperm(len(shards.shards), generator=torch.Generator().manual_seed(seed)).tolist()
    everyone = deal([shards.shards[i] for i in order], slots)
    for p in range(where.world_size):  # the same verdict on every process
        holds = sum(s.samples for mine in everyone[p * readers : (p + 1) * readers] for s in mine)
        owes = sum(shares(batching, Dist(p, where.world_size)))
        if 2 * holds < owes:
            raise LayerwiseError(
                f"this epoch's deal gives process {p} shards of {holds} images for its {owes}, so it would show "
                "them more than twice: write more shards of equal size (layerwise shard --shard-size)"
            )
    dealt = everyone[where.rank * readers : (where.rank + 1) * readers]
    held = [sum(s.samples for s in mine) for mine in dealt]
    need = sum(shares(batching, where))
    return EpochPlan(
        tuple(Reader(tuple(mine), q) for mine, q in zip(dealt, quotas(held, need), strict=True)),
        repeated=max(0, need - sum(held)),
        dropped=max(0, sum(held) - need),
    )


@dataclass(frozen=True)
class Reading:
    """How readers turn samples into uint8 crops: `decoding` (data.decode), the shuffle buffer's size (0: none), `chunk`
    images per item handed to the main process, whether a corrupt sample is skipped, and the epoch's seed."""

    decoding: Decoding
    buffer: int
    chunk: int
    skip: bool
    seed: int


def mixed(*numbers: int) -> int:
    """A seed made of integers: the same on every machine and Python build (hash() is not: it differs between
    32- and 64-bit builds and maps -1 and -2 alike)."""
    return int.from_bytes(hashlib.blake2b(repr(numbers).encode(), digest_size=8).digest(), "little") >> 1


def crop_seed(seed: int, position: int, rereading: int) -> int:
    """The seed of a sample's crop: the epoch's seed, its position in the dataset and how many times its reader
    has read it before in the epoch."""
    return mixed(seed, position, rereading)


Chunk = tuple[int, bool, Any, torch.Tensor, int]
"""(reader, whether it is the reader's last, its samples packed by data.decode's way or None for none, their
labels, the samples skipped before them)."""


class ShardStream(IterableDataset):
    """The readers of one process, for one epoch: DataLoader worker i runs readers i, i + workers, ... a chunk
    of each in turn (`in_reader_order` puts the chunks back in the readers' order, whatever the workers)."""

    def __init__(self, plan: EpochPlan, shards: Shards, reading: Reading, rank: int):
        self.plan, self.labels, self.reading, self.rank = plan, shards.labels, reading, rank

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        streams = [self.chunks(r) for r in range(worker, len(self.plan.readers), workers)]
        while streams:
            for stream in list(streams):
                chunk = next(stream)  # a reader's chunks end with one marked last
                yield chunk
                if chunk[1]:
                    streams.remove(stream)

    def chunks(self, r: int) -> Iterator[Chunk]:
        """Reader r's samples in chunks of `reading.chunk`, the last (perhaps empty) marked."""
        items, seeds, names, labels, skipped = [], [], [], [], 0
        pack = self.reading.decoding.pack
        for item, seed, name, label, skips in self.crops(r):
            skipped += skips
            if item is None:  # skips after the last sample
                continue
            items.append(item)
            seeds.append(seed)
            names.append(name)
            labels.append(self.labels[label])
            if len(items) == self.reading.chunk:
                yield r, False, pack(items, seeds, names), torch.tensor(labels), skipped
                items, seeds, names, labels, skipped = [], [], [], [], 0
        packed = pack(items, seeds, names) if items else None
        yield r, True, packed, torch.tensor(labels, dtype=torch.int64), skipped

    def crops(self, r: int) -> Iterator[tuple[Any, int, str, int, int]]:
        """Reader r's (item, its crop's seed, name, label, samples skipped before it): exactly its quota of them,
        or (evaluation) each of its samples once."""
        reader, reading = self.plan.readers[r], self.reading
        quota = reader.quota if reader.quota is not None else sum(s.samples for s in reader.shards)
        done, skipped, rereading, bad = 0, 0, 0, set()
        while done < quota:
            before = done
            for name, raw, label, position in self.shuffled(r):
                if position in bad:  # met before in this epoch: skipped again, warned and counted once
                    continue
                try:
                    seed = crop_seed(reading.seed, position, rereading)
                    item = reading.decoding.item(raw, name, seed)
                except LayerwiseError as e:
                    if not reading.skip:
                        raise LayerwiseError(f"{one_line(e)} (or skip such samples: data.corrupt=skip)") from None
                    log.warning("data.corrupt=skip: %s", e)
                    skipped += 1
                    bad.add(position)
                    continue
                yield item, seed, name, label, skipped
                done, skipped = done + 1, 0
                if done == quota:
                    return
            if reader.quota is None:  # evaluation: one pass, a skipped sample is not replaced
                if skipped:
                    yield None, 0, "", 0, skipped
                return
            if done == before:
                raise LayerwiseError(f"no sample of {reader.shards[0].path} and the shards after it can be decoded")
            rereading += 1

    def shuffled(self, r: int) -> Iterator[tuple[str, bytes, int, int]]:
        """Reader r's samples (name, encoded image, label, dataset position), through the shuffle buffer: up to
        data.shuffle_buffer samples and LAYERWISE_MAX_BUFFER_BYTES of them; when it is full, each new sample takes
        the place of one drawn at random, which goes on."""
        size, cap = self.reading.buffer, MAX_BUFFER_BYTES.get()
        pick = random.Random(mixed(self.reading.seed, self.rank, r))
        buffer, held = [], 0
        for s in self.plan.readers[r].shards:
            count = 0
            for key, raw, label in read_shard(s.path, len(self.labels)):
                if count == s.samples:
                    break
                sample = (f"{s.path}:{key}", raw, label, s.first + count)
                count += 1
                if size <= 1:
                    yield sample
                elif len(buffer) < size and (held + len(raw) <= cap or not buffer):
                    buffer.append(sample)
                    held += len(raw)
                else:
                    j = pick.randrange(len(buffer))
                    out, buffer[j] = buffer[j], sample
                    held += len(raw) - len(out[1])
                    yield out
            if count < s.samples:
                raise LayerwiseError(f"shard {s.path} holds {count} samples where index.json says {s.samples}; run "
                                     "layerwise shard again")  # fmt: skip
        pick.shuffle(buffer)
        yield from buffer


class ShardLoader(Batched):
    """Batches read from shards by DataLoader workers, normalised on the device (a Loader)."""

    def __init__(self, shards: Shards, cfg: DataConfig, feed: Feed):
        self.shards, self.device, self.train, self.where = shards, feed.device, feed.train, feed.where
        self.batching = Batching(len(shards), feed.batch_size, feed.where if feed.train else SINGLE)
        self.readers = max(1, cfg.workers)  # the same on every process: the deal depends on it
        self.workers = min(usable_workers(cfg.workers), self.readers)
        self.decoding = decoding_for(cfg.decode, imagenet_transform(cfg, feed.train), feed.device)
        self.normalize = Normalize(cfg.mean, cfg.std, feed.device)
        self.buffer, self.skip = cfg.shuffle_buffer, cfg.corrupt == "skip"
        # every process sums them after every epoch, a pipeline's later processes, which read nothing, too
        self.counts = {"repeated": 0, "dropped": 0, "skipped": 0}
        slots = self.readers * feed.where.world_size
        if feed.train and len(shards.shards) < slots:
            raise LayerwiseError(
                f"{len(shards.shards)} shards cannot give each of {feed.where.world_size} process(es) x "
                f"{self.readers} reader(s) one: write smaller shards (layerwise shard --shard-size) or lower "
                "data.workers"
            )

    def plan(self, seed: int) -> EpochPlan:
        if self.train:
            return train_plan(self.shards, self.readers, self.batching, self.where, seed)
        return EpochPlan(tuple(Reader(tuple(mine), None) for mine in deal(list(self.shards.shards), self.readers)))

    def batches(self, seed: int = 0, epoch: int = 0) -> Iterator[Batch]:
        seed = mixed(seed, epoch)
        plan = self.plan(seed)
        sizes = shares(self.batching, self.where if self.train else SINGLE)
        chunk = max(sizes, default=1)
        reading = Reading(self.decoding, self.buffer if self.train else 0, chunk, self.skip, seed)
        loader = DataLoader(
            ShardStream(plan, self.shards, reading, self.where.rank if self.train else 0),
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # not the global generator's next draw
            persistent_workers=False,
            worker_init_fn=release_inherited_locks,
        )
        self.counts = {"repeated": plan.repeated, "dropped": plan.dropped, "skipped": 0}
        for x, y in self.rebatched(in_reader_order(iter(loader), len(plan.readers)), sizes):
            yield self.normalize(x), y.to(self.device, non_blocking=True)

    def rebatched(self, chunks: Iterator[tuple[Any, torch.Tensor, int]], sizes: list[int]) -> Iterator[Batch]:
        """The readers' chunks as uint8 crops on the device (data.decode's way), cut into batches of `sizes`;
        counting the skipped samples."""
        xs, ys, held = [], [], 0
        for size in sizes:
            while held < size:
                packed, y, skipped = next(chunks, (None, None, 0))
                if y is None and not self.train and held:  # evaluation without the samples it skipped
                    yield torch.cat(xs), torch.cat(ys)
                    return
                if y is None and not self.train:
                    return
                if y is None:  # the plan's quotas add up to the shares: this is a defect, not bad data
                    raise LayerwiseError(f"the shard readers ended {size - held} images short of a batch")
                self.counts["skipped"] += skipped
                if len(y):  # a reader's last chunk may hold skips alone
                    xs.append(self.decoding.unpack(packed, self.device))
                    ys.append(y)
                    held += len(y)
            x, y = (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))  # no copy for a whole chunk
            yield x[:size], y[:size]
            xs, ys, held = [x[size:]], [y[size:]], held - size
        for _, _, skipped in chunks:  # the readers are done; a last chunk may carry skips only
            self.counts["skipped"] += skipped

    def epoch_counts(self) -> dict[str, int]:
        return dict(self.counts)


def in_reader_order(chunks: Iterator[Chunk], readers: int) -> Iterator[tuple[Any, torch.Tensor, int]]:
    """(packed, labels, skipped) of the readers' chunks in a fixed order, a chunk of each reader in turn, however
    many workers ran them and however the DataLoader interleaved those: so the batches depend on the readers (P and
    W), not on the CPUs. A chunk that comes early waits (only near an epoch's end, when readers finish unevenly)."""
    waiting = {r: collections.deque() for r in range(readers)}
    alive = list(range(readers))
    while alive:
        for r in list(alive):
            while not waiting[r]:
                chunk = next(chunks)
                waiting[chunk[0]].append(chunk)
            _, last, packed, y, skipped = waiting[r].popleft()
            yield packed, y, skipped
            if last:
                alive.remove(r)


# ---------------------------------------------------------------- naming shards


def is_shard_spec(path: str | Path | None) -> bool:
    """Whether `--data` names shards: a brace pattern (a path that does not exist, with a {first..last} range), a
    folder whose index.json is a shard index's, or a .txt list of shards."""
    if path is None:
        return False
    p = Path(path).expanduser()
    if not p.exists():
        return RANGE.search(str(path)) is not None
    if p.is_dir():
        try:
            return FORMAT in read_text(p / "index.json", RUN_FILE)[:1000]
        except (OSError, ValueError):  # none, or not text: an image folder
            return False
    return p.suffix == ".txt"


def expand(pattern: str) -> list[str]:
    """A brace pattern's names: one numeric range {first..last}, zero-padded to first's width."""
    found = RANGE.search(pattern)
    if found is None or "{" in pattern[found.end() :] or "{" in pattern[: found.start()]:
        raise LayerwiseError(f"{pattern}: a shard pattern holds one range such as train-{{000000..000099}}.tar")
    first, last = int(found[1]), int(found[2])
    if not 0 <= last - first < MAX_SHARDS:
        raise LayerwiseError(f"{pattern}: the range must run upward and name fewer than {MAX_SHARDS} shards")
    head, tail = pattern[: found.start()], pattern[found.end() :]
    return [f"{head}{i:0{len(found[1])}d}{tail}" for i in range(first, last + 1)]


def listed(path: Path) -> list[str]:
    """The shards of a list file: one path per line (relative to the file's folder), blank and # lines aside."""
    try:
        lines = [line.strip() for line in read_text(path, RUN_FILE).splitlines()]
    except (OSError, ValueError) as e:
        raise LayerwiseError(f"cannot read the shard list {path} ({type(e).__name__})") from None
    names = [str(path.parent / line) for line in lines if line and not line.startswith("#")]
    if not names:
        raise LayerwiseError(f"{path} lists no shards; write one shard path per line")
    return names


def named_shards(spec: str | Path) -> tuple[dict, dict[str, list[Shard]]]:
    """The shard index and, by split, the shards `spec` names: every split of a folder, or the one split that the
    shards of a pattern or list belong to (under "selected")."""
    p = Path(spec).expanduser()
    if p.is_dir():
        index = read_index(p)
        splits = index["splits"].items()
        return index, {split: rows_to_shards(p, rows, [r["name"] for r in rows]) for split, rows in splits}
    names = listed(p) if p.is_file() else expand(str(p))
    if len({Path(n).name for n in names}) != len(names):
        raise LayerwiseError(f"{spec} names a shard twice; name each once")
    folders = {Path(n).parent for n in names}
    if len(folders) != 1:
        raise LayerwiseError(f"{spec}: the shards must sit in one folder, beside its index.json")
    (folder,) = folders
    index = read_index(folder)
    for split, rows in index["splits"].items():
        known = {r["name"] for r in rows}
        if Path(names[0]).name in known:
            missing = [n for n in names if Path(n).name not in known]
            if missing:
                raise LayerwiseError(f"{missing[0]} is not a {split} shard of {folder / 'index.json'}")
            return index, {"selected": rows_to_shards(folder, rows, [Path(n).name for n in names])}
    raise LayerwiseError(f"{names[0]} is not in {folder / 'index.json'}; run layerwise shard for it")


def rows_to_shards(folder: Path, rows: list[dict], names: list[str]) -> list[Shard]:
    firsts, at = {}, 0
    for r in rows:
        firsts[r["name"]] = (at, r["samples"])
        at += r["samples"]
    out = []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise LayerwiseError(f"shard {path} is missing; run layerwise shard again")
        first, samples = firsts[name]
        out.append(Shard(path, samples, first))
    return out


def to_source(shards: list[Shard], index: dict, classes: list[str], decode: bool, size: int) -> Decoded | Shards:
    """Shards as examples labelled with `classes`: decoded into memory (data.augment=cifar) or streamed."""
    names = index["classes"]
    labels = tuple(class_index(classes, c, shards[0].path.parent) for c in names)
    if not decode:
        return Shards(tuple(shards), labels)
    budget, records = Budget(shards[0].path.parent), []
    for s in shards:
        for i, (key, raw, label) in enumerate(read_shard(s.path, len(names))):
            if i < s.samples:
                budget.take(f"{s.path}:{key}", len(raw))
                records.append(Record(f"{s.path}:{key}", "", names[label], raw))
    return to_examples(records, classes, True, size, "decoding shards")


def open_train_shards(spec: str | Path, decode: bool, size: int) -> TrainSource:
    """Training data from shards: a folder's train split (and val split, if any), or the shards named."""
    index, splits = named_shards(spec)
    classes = index["classes"]
    train = splits.get("selected") or splits.get("train")
    if not train:
        raise LayerwiseError(f"{spec} has no train shards; name them, or shard a source with train images")
    val = splits.get("val") if "selected" not in splits else None
    return TrainSource(
        classes,
        to_source(train, index, classes, decode, size),
        to_source(val, index, classes, decode, size) if val else None,
        f"shards {spec} ({len(train)} shards)",
    )


def open_eval_shards(spec: str | Path, decode: bool, size: int, classes: list[str]) -> Decoded | Shards:
    """Held-out data from shards: the shards named, or a folder's test split, else its val split."""
    index, splits = named_shards(spec)
    chosen = splits.get("selected") or splits.get("test") or splits.get("val")
    if not chosen:
        raise LayerwiseError(f"{spec} has only train shards; evaluate on data no one trained on (val or test)")
    return to_source(chosen, index, classes, decode, size)

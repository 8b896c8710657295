"""`layerwise predict`: the top classes of image files, each answer given as soon as it is ready.

Inputs are image files, folders (every image below them), `@LIST` (a file of inputs, one per line) and `-`
(inputs read from stdin, one per line). A pool of threads reads and decodes the images while the network
scores the batch before; the decoders (torchvision's, PIL's) release the GIL. A batch goes to the network
when it is full, or as soon as the next input is not there yet: an answer to a path typed on stdin comes at
once, and a folder of 10,000 images runs in full batches. Answers come in input order; an image that cannot
be read answers with its error, and the others are still answered.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torchvision.transforms import v2

from layerwise.config import RunConfig, config_from_dict
from layerwise.data.images import IMAGE_EXTENSIONS, read_image
from layerwise.data.loaders import Normalize, imagenet_transform, to_channels
from layerwise.device import precision_for, resolve_device
from layerwise.errors import LayerwiseError
from layerwise.evaluate import flipped
from layerwise.rundir import RunDir

MAX_LINE = 16_384
"""Characters in one line of a list or of stdin: far more than any path; a longer line is an error entry."""

IDLE_WAIT_S = 0.02
"""How long a part-filled batch waits for the next input before it is scored anyway."""


@dataclass
class Input:
    """One image to answer, or a reason there is none (an unreadable list, a folder without images)."""

    name: str
    error: str | None = None


def expand(items: Iterable[str], stdin: IO[str] | None = None) -> Iterator[Input]:
    """The images the command line names, lazily: a file as given; a folder as every image file below it
    (extensions as IMAGE_EXTENSIONS, in sorted order, hidden files and linked folders skipped); `@LIST` and `-`
    (stdin) as the inputs on their lines, blank lines skipped. A line may name a file or a folder, not
    another list."""
    for item in items:
        if item == "-":
            yield from _lines(stdin or sys.stdin, "stdin")
        elif item.startswith("@"):
            try:
                with open(item[1:], encoding="utf-8", errors="surrogateescape", newline=None) as f:
                    yield from _lines(f, item[1:])
            except OSError as e:
                yield Input(item, f"cannot read the list {item[1:]} ({e.strerror or type(e).__name__})")
        else:
            yield from _path(item)


def _lines(f: IO[str], where: str) -> Iterator[Input]:
    number = 0
    while line := f.readline(MAX_LINE + 1):
        number += 1
        if len(line) > MAX_LINE and not line.endswith("\n"):
            while (rest := f.readline(MAX_LINE)) and not rest.endswith("\n"):
                pass  # skip the rest of the line without holding it
            yield Input(f"{where}:{number}", f"line {number} of {where} is longer than {MAX_LINE:,} characters")
        elif line := line.rstrip("\r\n"):
            yield from _path(line)


def _path(name: str) -> Iterator[Input]:
    if not os.path.isdir(name):
        yield Input(name)  # a missing or unreadable file answers with its own error when it is read
        return
    found = False
    for image in _images_below(name):
        found = True
        yield image
    if not found:
        yield Input(name, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder {name}")


def _images_below(top: str) -> Iterator[Input]:
    """Depth first: a folder's images in name order, then its subfolders in name order."""
    folders = [top]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Input(folder, f"cannot list the folder {folder} ({e.strerror or type(e).__name__})")
            continue
        below = []
        for e in entries:
            if e.name.startswith("."):  # hidden, and macOS's ._name.jpg resource forks are not images
                continue
            if e.is_dir(follow_symlinks=False):
                below.append(e.path)
            elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                yield Input(e.path)
        folders.extend(reversed(below))


def load_image(path: str | Path, cfg: RunConfig) -> torch.Tensor:
    """(C, S, S) uint8, as evaluation sees images: resized (shorter side) and centre-cropped to the run's size,
    with its channels (model.in_channels)."""
    image = read_image(path)  # sized from its header first; the first frame of an animated image
    size = cfg.data.image_size
    if cfg.data.augment == "imagenet":
        return imagenet_transform(cfg.data, train=False)(image)
    if tuple(image.shape[1:]) != (size, size):
        image = v2.CenterCrop(size)(v2.Resize(size, antialias=True)(image))
    return to_channels(image, cfg.model.in_channels)


_END = object()


def batches(inputs: Iterator[Input], decode, size: int, workers: int) -> Iterator[list[tuple[Input, Future | None]]]:
    """Lists of up to `size` inputs with their decoding futures, in input order. A thread walks the inputs and
    hands each to a pool of `workers` decoding threads, at most 2 x size ahead of the batch being answered, so
    memory stays bounded whatever the number of inputs. A list is cut short when the next input is not there
    yet (stdin waits for its next line)."""
    ready: queue.Queue = queue.Queue(maxsize=2 * size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def walk() -> None:
        try:
            for item in inputs:
                if not put((item, None if item.error else pool.submit(decode, item.name))):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the answering thread
            put(e)
        put(_END)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    threading.Thread(target=walk, name="inputs", daemon=True).start()  # daemon: it may wait on stdin
    batch = []
    try:
        while True:
            try:
                item = ready.get(timeout=IDLE_WAIT_S if batch else None)
            except queue.Empty:
                yield batch
                batch = []
                continue
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        stop.set()  # an early stop (a closed pipe) ends the walk at its next input
        pool.shutdown(cancel_futures=True)


@dataclass(frozen=True)
class Answering:
    """How `predict` answers: the `top` classes of the last delivered head, or with `early_exit` of the first head
    as confident as the run's calibrated threshold; with `flip`, the head's logits averaged over the image and its
    mirror first (test-time flip). `batch_size` images are scored at once on `device`, decoded by `workers`
    threads."""

    top: int = 5
    early_exit: bool = False
    flip: bool = False
    device: str = "auto"
    batch_size: int = 64
    workers: int = 4


def predict(
    run_dir: str | Path, images: Iterable[str], how: Answering = Answering(), stdin: IO[str] | None = None
) -> Iterator[dict[str, Any]]:
    """For each input (see `expand`), in order: {"image", "head", "top": [{"class", "probability"}, ...]} (softmax
    probabilities, as `how` says), or {"image", "error"} for an input that gave no image."""
    top, early_exit, flip, device, batch_size, workers = (
        how.top,
        how.early_exit,
        how.flip,
        how.device,
        how.batch_size,
        how.workers,
    )
    from layerwise.delivered import load_delivered
    from layerwise.early_exit import exits

    if top < 1:
        raise LayerwiseError(f"--top must be >= 1 (got {top})")
    if flip and early_exit:
        raise LayerwiseError("--flip and --early-exit exclude each other (the exit threshold is calibrated without)")
    if batch_size < 1 or workers < 1:
        raise LayerwiseError(f"--batch-size and --workers must be >= 1 (got {batch_size} and {workers})")
    cfg = config_from_dict(RunDir(run_dir).saved_config())
    compute = precision_for(resolve_device(device), cfg.train.precision)
    got = load_delivered(run_dir, compute)
    threshold = calibrated_threshold(got) if early_exit else None
    normalize = Normalize(cfg.data.mean, cfg.data.std, compute.device)
    net = got.net.eval()
    scored = got.heads if early_exit else got.heads[-1:]  # without early exit, the last head alone answers
    for batch in batches(expand(images, stdin), lambda p: load_image(p, cfg), batch_size, workers):
        entries, pixels = [], []
        for item, future in batch:
            try:
                if item.error:
                    raise LayerwiseError(item.error)
                pixels.append(future.result())
                entries.append({"image": item.name})
            except LayerwiseError as e:
                entries.append({"image": item.name, "error": str(e)})
        if pixels:
            x = normalize(torch.stack(pixels).to(compute.device, non_blocking=True))
            with torch.no_grad(), compute.autocast():
                logits = flipped(net, x, flip, upto=max(scored), heads=scored)
                probs = torch.stack([z.float().softmax(-1) for z in logits], 1)  # (N, heads, C)
            answer = torch.full((len(pixels),), len(scored) - 1)
            if threshold is not None:
                answer = exits(probs.max(-1).values.cpu(), threshold)
            p, k = probs[torch.arange(len(pixels)), answer.to(probs.device)].topk(min(top, probs.shape[-1]))
            answered = iter(zip(answer.tolist(), p.tolist(), k.tolist(), strict=True))
            for entry in entries:
                if "error" not in entry:
                    head, values, indices = next(answered)
                    entry["head"] = scored[head]
                    entry["top"] = [
                        {"class": got.classes[i], "probability": v} for v, i in zip(values, indices, strict=True)
                    ]
        yield from entries


def calibrated_threshold(got) -> float | None:
    """The early-exit threshold `layerwise eval --early-exit` calibrated last for this checkpoint and these heads
    (on the run's own validation split, whatever data it then scored): None means answer with the last head. A
    one-line error naming that command when there is none."""
    if len(got.heads) < 2:
        raise LayerwiseError(
            "early exit needs two heads that classify or more; this run delivers one (end to end, one block, or "
            "a method whose other heads give no class scores)"
        )
    mtime = got.checkpoint.stat().st_mtime_ns
    saved = [
        r
        for r in got.run.read_facts(got.run.path / "early_exit.json").values()
        if r.get("checkpoint") == str(got.checkpoint) and r.get("checkpoint_mtime_ns") == mtime
        and r.get("heads") == got.heads
    ]  # fmt: skip
    if not saved:
        raise LayerwiseError(
            f"no threshold calibrated for this checkpoint yet: run `layerwise eval {got.run.path} --data DATA "
            "--early-exit` first"
        )
    return saved[-1]["calibration"]["threshold"]  # the newest

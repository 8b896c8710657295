"""Frozen-prefix caching: the frozen blocks' output, computed once per augmented view and reused.

In greedy stage j the blocks before j never change, so recomputing them every epoch is wasted work. The
cache runs them once over `views` augmented copies of the training set and stores x_j. Epoch e then
trains on view e mod `views`, in its own shuffled order. View v is built with epoch v's augmentation,
so with views >= epochs the cached run sees exactly the batches of the plain run; with fewer views each
image's crop and flip repeat every `views` epochs (the cost of caching, measured in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from layerwise.config import TrainConfig
from layerwise.data.loaders import Batched, MemoryLoader
from layerwise.device import Precision
from layerwise.distributed import Dist
from layerwise.errors import LayerwiseError
from layerwise.limits import human_bytes as human
from layerwise.models.staged import StagedNet
from layerwise.safe_io import folder, split
from layerwise.stages import Stage, module_bytes, plan_stages, resident_modules
from layerwise.train.schedule import stage_epochs

log = logging.getLogger("layerwise")


def prefix_shapes(net: StagedNet, image: torch.Tensor) -> list[tuple[int, ...]]:
    """Shape of x_j for one image, for every block j (x_0 is the image). One image through the net, each block
    on the device it is on (place_for keeps the blocks a stage does not run on the CPU)."""
    shapes = [tuple(image.shape[1:])]
    was_training = net.training
    net.eval()
    with torch.no_grad():
        x = image
        for block in net.blocks:
            x = block(x.to(next(block.parameters()).device))
            shapes.append(tuple(x.shape[1:]))
    net.train(was_training)
    return shapes


def cache_bytes(n: int, views: int, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return n * views * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def free_bytes(where: str, device: torch.device, folder: Path) -> int:
    """Memory (or disk) available for a cache at `where`."""
    if where == "device" and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if where in ("device", "host"):
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError):
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    existing = next(p for p in [folder, *folder.parents] if p.exists())  # the run folder may not exist yet
    return shutil.disk_usage(existing).free


def check_cache_fits(needed: int, where: str, device: torch.device, folder: Path, what: str) -> None:
    """Refuse a cache that will not fit, before any work starts. Keeps a fifth of the memory for training."""
    available = free_bytes(where, device, folder)
    if needed > 0.8 * available:
        others = " or ".join(w for w in ("host", "disk") if w != where)
        raise LayerwiseError(
            f"train.cache={where} needs {human(needed)} for {what} but only {human(available)} is free; "
            f"lower train.cache_views, or use train.cache={others}"
        )


def cache_views(cfg: TrainConfig, stage: Stage | None = None) -> int:
    """train.cache_views, but no more than the stage's epochs (without a stage: the most of any greedy block's):
    views beyond them would never be read."""
    epochs = stage_epochs(cfg, stage) if stage is not None else max(cfg.block_epochs or [cfg.epochs_per_block])
    return min(cfg.cache_views, epochs)


def check_cache(
    net: StagedNet, images: MemoryLoader, cfg: TrainConfig, precision: Precision, where: Dist, cache_dir: Path
) -> None:
    """Size the largest prefix cache of a run and refuse it now if it cannot fit (every process of this node
    holds its own copy in host memory, and of the run on a disk cache)."""
    device, dtype = precision.device, precision.dtype
    shapes = prefix_shapes(net, images.normalize(images.images[:1]))
    n, views = images.num_examples, cache_views(cfg)
    on_gpu = cfg.cache == "device" and device.type == "cuda"
    copies = 1 if on_gpu else where.world_size if cfg.cache == "disk" else where.local_world_size

    def weights(stage: Stage) -> int:  # a GPU cache must leave room for the weights the stage brings there
        return module_bytes(resident_modules(net, stage), off=device) if on_gpu else 0

    cached = [s for s in plan_stages(net.J, "greedy") if s.cacheable]
    stage = max(cached, key=lambda s: cache_bytes(n, views, shapes[s.first], dtype) + weights(s))
    needed = cache_bytes(n, views, shapes[stage.first], dtype)
    shape = "x".join(map(str, shapes[stage.first]))
    what = f"block {stage.first}'s input ({views} view(s) of {n} images at {shape}, {dtype})"
    what += f" in each of {copies} processes" if copies > 1 else ""
    if weights(stage):
        what += f" and the {human(weights(stage))} of weights that stage brings to the device"
    check_cache_fits(copies * needed + weights(stage), cfg.cache, device, cache_dir, what)
    log.info("prefix cache: at most %.2f GiB (%s)", copies * needed / 2**30, what)


@dataclass(frozen=True)
class CachePlan:
    """What a prefix cache holds: block `upto`'s input, one view per seed of `view_seeds` (view v is epoch v's
    augmentation), in `store`: "device", "host", or the file of a disk cache below the run directory `root`."""

    upto: int
    view_seeds: tuple[int, ...]
    store: str | Path
    root: Path | None = None


class PrefixCache(Batched):
    """A loader of x_j, the frozen blocks' output, for greedy stage j (a Loader; its batches are the images'
    loader's, in the same order).

    On a GPU the store is (views, N, H, W, C): batches come out channels_last, the network's layout, and
    host or disk stores are gathered straight into pinned memory for an asynchronous copy.

    `store` is "device", "host", or the file of a disk cache. Under DDP every process caches the whole training
    set (the same x_j on every process; a disk cache in a file of its own) and reads its share of each batch.
    """

    def __init__(self, net: StagedNet, images: MemoryLoader, plan: CachePlan, precision: Precision):
        upto, view_seeds, store, root = plan.upto, plan.view_seeds, plan.store, plan.root
        self.offset, self.batching = upto, images.batching
        self.images, self.labels = images, images.labels
        self.device, self.batch_size = images.device, images.batch_size
        self.views = len(view_seeds)
        self.nhwc = self.device.type == "cuda"
        dtype = precision.dtype
        where = store if isinstance(store, str) else "disk"
        n = len(images.labels)
        c, h, w = prefix_shapes(net, images.normalize(images.images[:1]))[upto]
        full = (self.views, n, h, w, c) if self.nhwc else (self.views, n, c, h, w)
        self.path = None
        try:
            if where == "disk":
                self.path, self.root = Path(store), root or Path(store).parent
                self.store = disk_store(self.path, self.root, full, dtype)
            else:
                on = self.device if where == "device" else torch.device("cpu")
                pin = where == "host" and self.device.type == "cuda"
                self.store = torch.empty(full, dtype=dtype, device=on, pin_memory=pin)
        except (RuntimeError, OSError) as e:
            raise LayerwiseError(
                f"could not allocate the train.cache={where} store of {human(math.prod(full) * dtype.itemsize)} "
                f"({str(e).splitlines()[0]}); use fewer train.cache_views or another train.cache"
            ) from None
        self.targets: list[torch.Tensor] = []  # each view's labels (data.mix: its class probabilities)
        net.eval()
        with torch.no_grad(), precision.autocast():
            for v, seed in enumerate(view_seeds):
                _, plan = images.epoch_plan(seed, v)  # view v is epoch v's
                plan = plan.to(self.device)
                self.targets.append(plan.targets(images.labels, torch.arange(n, device=self.device)))
                for start in range(0, n, self.batch_size):
                    idx = torch.arange(start, min(start + self.batch_size, n), device=self.device)
                    x = plan.view(images.images, idx, images.normalize)
                    out = net.forward_features(x, 0, upto)
                    out = out.permute(0, 2, 3, 1) if self.nhwc else out  # channels_last -> NHWC is a free view
                    self.store[v, start : start + len(idx)].copy_(out)

    def batches(self, seed: int, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, _ = self.images.epoch_plan(seed)  # the plain path's order for this epoch (on the CPU)
        view, targets = self.store[epoch % self.views], self.targets[epoch % self.views]
        on_device = view.device == self.device
        order_here = order.to(view.device)
        for idx in self.images.batching.shares(order_here):
            if on_device:
                x = view[idx]
            else:  # gather into pinned memory (PyTorch's caching host allocator), then copy asynchronously
                pinned = self.device.type == "cuda"
                x = torch.empty((len(idx), *view.shape[1:]), dtype=view.dtype, pin_memory=pinned)
                torch.index_select(view, 0, idx, out=x)
                x = x.to(self.device, non_blocking=True)
            yield (x.permute(0, 3, 1, 2) if self.nhwc else x), targets[idx.to(targets.device)]

    def close(self) -> None:
        """Free the cache (and delete its file) before the next stage builds its own."""
        self.store, self.targets = None, []
        if self.path is not None:
            root, rel, name = split(self.path, self.root)
            with folder(root, rel) as fd, contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)


def disk_store(path: Path, root: Path, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A memory-mapped tensor in a new file at path (below the run directory `root`, through no link), its blocks
    reserved now: a full disk later would kill the process."""
    root, rel, name = split(path, root)
    with folder(root, rel, create=True) as fd:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        handle = os.open(name, flags, 0o644, dir_fd=fd)
    try:
        os.posix_fallocate(handle, 0, math.prod(shape) * dtype.itemsize)
        # Mapped through this descriptor: whatever the name points to later, the file is the one just made.
        by_fd = f"/proc/self/fd/{handle}" if os.path.isdir("/proc/self/fd") else str(path)
        return torch.from_file(by_fd, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
    finally:
        os.close(handle)

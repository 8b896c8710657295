"""torchrun and DistributedDataParallel: the one module that knows the process's rank.

`torchrun --nproc-per-node N -m layerwise train ...` starts N processes and tells each its RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE through the environment. Without those variables a run is one process
(`Dist()`, world size 1) and nothing here calls torch.distributed at all.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from layerwise.errors import LayerwiseError, one_line
from layerwise.limits import DIST_TIMEOUT

if TYPE_CHECKING:
    from layerwise.config import TrainConfig
    from layerwise.device import Precision

T = TypeVar("T")


@dataclass(frozen=True)
class Replicas:
    """The processes that split each batch (data parallelism), and this one's place among them. A run's processes
    all do, unless a runner groups them otherwise (a pipeline's replicas: train/pipeline)."""

    index: int = 0
    count: int = 1
    group: Any = None
    """Their torch.distributed process group; None: every process of the run."""
    root: int = 0
    """The global rank of replica 0, whose buffers every replica takes (broadcast)."""

    @property
    def active(self) -> bool:
        return self.count > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over the replicas, in place (a no-op for one)."""
        if self.active:
            dist.all_reduce(t, group=self.group)
        return t

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Give every replica replica 0's copy of `tensors`: each process updated its own BN running statistics
        from its own share of the last batch, and the saved checkpoint holds replica 0's."""
        if self.active:
            for t in tensors:
                dist.broadcast(t, self.root, group=self.group)

    def shards(self, where: Dist) -> Dist:
        """The Dist the data loaders shard by: one shard per replica."""
        return Dist(self.index, self.count, where.local_rank, where.local_world_size)


ALONE = Replicas()


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the run: its rank among `world_size` processes, and on its own node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def replicas(self) -> Replicas:
        """Every process of the run splitting each batch (data parallelism over all of them)."""
        return Replicas(self.rank, self.world_size)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run's files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum t over every process, in place (a no-op in a single process)."""
        if self.active:
            dist.all_reduce(t)
        return t

    def from_main(self, value: T) -> T:
        """Rank 0's `value`, on every process."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def agree(self, work: Callable[[], T]) -> T:
        """Run `work` on every process; if it raised a LayerwiseError on any of them, raise one on all of them.

        Use it where only some processes can fail (rank 0 takes the lock, one node lacks the data), so that no
        process goes on into a collective that the failed one will never reach. The other processes' copy of
        the error is `quiet`: only the ones that failed print it.
        """
        if not self.active:
            return work()
        result, error = None, None
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - whatever it is, the other processes must hear of it
            error = e
        errors = [None] * self.world_size
        dist.all_gather_object(errors, None if error is None else one_line(error))
        if error is not None:
            raise error
        for rank, other in enumerate(errors):
            if other is not None:
                raise QuietError(f"process {rank} of the run failed: {other}")
        return result


class QuietError(LayerwiseError):
    """An error another process has already reported; the CLI does not print it again."""


SINGLE = Dist()


def from_env() -> Dist:
    """The Dist torchrun describes in the environment, or SINGLE outside torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    try:
        world = int(os.environ["WORLD_SIZE"])
        return Dist(
            rank=int(os.environ["RANK"]),
            world_size=world,
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        )
    except (KeyError, ValueError):
        raise LayerwiseError("WORLD_SIZE is set but RANK is missing or not a number; start with torchrun") from None


def device_for(name: str, where: Dist) -> str:
    """The device name for this process: under torchrun each process takes the GPU of its local rank."""
    if not where.active or name == "cpu":
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            return name
    if name != "cuda":
        raise LayerwiseError(
            f"under torchrun each process uses the GPU of its local rank; pass --device cuda or auto, not {name!r}"
        )
    if torch.cuda.is_available() and where.local_rank >= torch.cuda.device_count():
        raise LayerwiseError(
            f"local rank {where.local_rank} has no GPU: {torch.cuda.device_count()} visible on this node; "
            "lower --nproc-per-node"
        )
    return f"cuda:{where.local_rank}"


def check_batch(batch_size: int, replicas: int) -> None:
    if batch_size % replicas:
        raise LayerwiseError(
            f"train.batch_size={batch_size} is the global batch and must divide by the {replicas} "
            "processes; change --batch-size or --nproc-per-node"
        )


def compute_for(cfg: TrainConfig, where: Dist) -> Precision:
    """The device and precision this process trains with (under torchrun, its local GPU), refusing first what
    cannot run there. `train` and `bench` both start here."""
    from layerwise.device import precision_for, resolve_device

    device = resolve_device(device_for(cfg.device, where))
    if cfg.sync_bn and where.active and device.type != "cuda":
        raise LayerwiseError("train.sync_bn needs GPUs: PyTorch's SyncBatchNorm does not run on the CPU (gloo)")
    return precision_for(device, cfg.precision)


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes; a one-line error when this torch lacks it."""
    name = "nccl" if device.type == "cuda" else "gloo"
    available = dist.is_available() and (dist.is_nccl_available() if name == "nccl" else dist.is_gloo_available())
    if not available:
        raise LayerwiseError(f"torch.distributed backend {name!r} is not available in this torch build")
    return name


@contextmanager
def process_group(where: Dist, device: torch.device) -> Iterator[None]:
    """Join the run's process group for the duration (unless it is one process, or the caller already did)."""
    if not where.active or dist.is_initialized():
        yield
        return
    backend = backend_for(device)
    # Collectives give up after this long, so a process whose peer hangs (rather than dies) stops too.
    timeout = datetime.timedelta(seconds=DIST_TIMEOUT.get())  # LAYERWISE_DIST_TIMEOUT, default 1800 s
    options = {"device_id": device} if device.type == "cuda" else {}
    store = job_store(timeout)
    if store is not None:  # under torchrun, each attempt in its own keys (see attempt_store)
        options.update(store=attempt_store(store), rank=where.rank, world_size=where.world_size)
    try:
        dist.init_process_group(backend, timeout=timeout, **options)
    except ValueError as e:  # the environment lacks what torchrun sets (MASTER_ADDR, ...)
        raise LayerwiseError(
            f"cannot join the run's processes ({str(e).splitlines()[0]}); start with torchrun"
        ) from None
    try:
        yield
    except (QuietError, KeyboardInterrupt):  # another process failed first; or the user or torchrun stopped it
        raise
    except BaseException as e:
        report_failure(where, one_line(e))  # before leaving the group: the others see its connections close
        raise
    finally:
        dist.destroy_process_group()


# ---- when one process of a torchrun job fails
#
# Its error is the job's error: the others stop quietly. They learn that it has reported its error from torchrun's
# agent store, which every worker of the job can reach and which outlives the workers; a process that dies
# without reporting (SIGKILL, the OOM killer) leaves no note, so the others then say why they stopped.

FAILED_KEY = "layerwise/failed/attempt{}"


def elastic_attempt() -> int:
    """torchrun's restart count: 0 on the job's first attempt, n on its n-th restart (--max-restarts)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def job_store(timeout: datetime.timedelta = datetime.timedelta(seconds=5)) -> dist.TCPStore | None:
    """A client of the torchrun job's agent store, or None outside torchrun or when it cannot be reached."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout,
            wait_for_workers=False,
        )  # fmt: skip
    except (KeyError, ValueError, RuntimeError):
        return None


def attempt_store(store: dist.Store) -> dist.Store:
    """The job's store seen through a prefix of torchrun's attempt. torchrun's agent keeps one store for all the
    job's attempts (torch 2.14), and the process group's keys carry no attempt: a restarted gloo process read a
    dead peer's address from the attempt before ("Connection refused") in 3 of 7 tries here; with the prefix,
    in none of 8."""
    return dist.PrefixStore(f"layerwise/attempt{elastic_attempt()}/", store)


def report_failure(where: Dist, line: str) -> None:
    """Note in the job's store that this process failed with `line` (which the CLI prints), and give torchrun's
    failure summary the line (its error file), rounded down to the second so that it reads as the first."""
    if not where.active:
        return
    store = job_store()
    if store is not None:
        with suppress(RuntimeError):
            store.set(FAILED_KEY.format(elastic_attempt()), f"process {where.rank}: {line}")
    write_error_file(line, math.floor(time.time()))


def reported_failure(where: Dist) -> str | None:
    """ "process R: its line" when another process of this attempt has reported its failure, else None."""
    store = job_store() if where.active else None
    key = FAILED_KEY.format(elastic_attempt())
    try:
        return store.get(key).decode(errors="replace") if store is not None and store.check([key]) else None
    except RuntimeError:
        return None


def stop_quietly(where: Dist) -> bool:
    """Whether this process, stopping because another failed (its connection closed, or torchrun's SIGTERM),
    should say nothing: the failed one has said why. torchrun's summary then names it as the root cause."""
    reported = reported_failure(where)
    if reported is None:
        return False
    write_error_file(f"stopped because {reported.split(':', 1)[0]} failed", math.ceil(time.time()))
    return True


def write_error_file(message: str, timestamp: int) -> None:
    """torchrun's per-process error file (TORCHELASTIC_ERROR_FILE), in the form its failure summary reads:
    the earliest timestamp is the root cause it names."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with suppress(OSError), open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(timestamp)}}}, f)


def is_peer_failure(error: BaseException) -> bool:
    """Whether a collective failed because another process of the run stopped (its connection closed)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    )


def peer_failure(error: BaseException) -> str:
    """The gist of a collective's failure, without the backend's source paths and advice."""
    text = " ".join(str(error).split())
    found = re.search(r"Connection (reset|closed) by peer|timed out|[Tt]imeout", text)
    return found.group(0) if found else text[:120]

"""Pipelined decoupled training (`--mode decoupled --placement pipeline`): P processes, each holding a group of
consecutive blocks with their heads and optimizers.

Process 0 reads the batches; every process trains its blocks on what it receives, and sends the detached output
of its last block with the labels to the next process before its own backward pass, so activations and labels
flow forward only and no process waits for another's update. With every block trained on the output of the block
before it, for the same batch, taken before that block's update, the result is single-process decoupled training
(train/stage.py's `decoupled`), computed in P places at once.

The processes talk by torch.distributed point-to-point (gloo on the CPU, NCCL between GPUs) in a process group of
their own. Each message is a tensor whose shape and dtype travel ahead of it (`Pipe`), so a short last batch needs
nothing special. Epoch figures and evaluation counts are all-reduced with each head's row filled by the process
that holds it; rank 0 gathers every block's weights and optimizer state after each epoch and alone writes the run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from layerwise.config import RunConfig
from layerwise.distributed import Dist
from layerwise.errors import LayerwiseError
from layerwise.evaluate import add_to_ensemble, figures, summed_loss, topk_correct
from layerwise.models.partition import balanced_cut
from layerwise.models.staged import StagedNet
from layerwise.stages import Stage

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64)
MAX_DIMS = 6
"""A header is [dtype code, ndim, channels_last, *shape padded to MAX_DIMS]."""
HEADER = 3 + MAX_DIMS
END = -1
"""The dtype code of the header that ends an epoch's training batches: a process with replays sends on as many
batches as it trains on, so the next one cannot count them in advance."""


class Pipe:
    """Tensors to the next pipeline process and from the one before, each preceded by its shape and dtype.

    `send` returns at once (isend): the process goes on to its backward pass while the tensors travel; the sends
    of the previous message are waited for first, so at most one message per link is in flight and its tensors
    stay alive until sent.
    """

    def __init__(self, prev: int | None, next: int | None, device: torch.device, group=None):
        self.prev, self.next, self.device, self.group = prev, next, device, group
        self.pending: list = []

    def send(self, *tensors: torch.Tensor) -> None:
        self.flush()
        for t in tensors:
            t = t.detach()
            if t.dtype not in DTYPES or t.dim() > MAX_DIMS:
                raise LayerwiseError(
                    f"a pipeline cannot pass a {t.dtype} tensor of {t.dim()} dimensions between blocks"
                )
            shape = tuple(t.shape)
            # channels_last travels as the contiguous (N, H, W, C) tensor it is, and arrives as channels_last
            last = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
            t = t.permute(0, 2, 3, 1) if last else t.contiguous()
            header = [DTYPES.index(t.dtype), t.dim(), int(last), *shape, *[0] * (MAX_DIMS - t.dim())]
            head = torch.tensor(header, dtype=torch.int64, device=self.device)
            self.pending += [head, t]  # kept alive until sent
            self.pending += [dist.isend(head, self.next, group=self.group), dist.isend(t, self.next, group=self.group)]

    def send_end(self) -> None:
        """Mark the end of an epoch's batches: the next process's `recv` returns None for it."""
        self.flush()
        head = torch.tensor([END, *[0] * (HEADER - 1)], dtype=torch.int64, device=self.device)
        self.pending += [head, dist.isend(head, self.next, group=self.group)]

    def recv(self, count: int) -> list[torch.Tensor] | None:
        """The next message's `count` tensors, or None for the end of an epoch (send_end)."""
        out = []
        for _ in range(count):
            head = torch.empty(HEADER, dtype=torch.int64, device=self.device)
            dist.recv(head, self.prev, group=self.group)
            code, ndim, last, *shape = head.tolist()
            if code == END:
                return None
            n, c, h, w = shape[:4]
            t = torch.empty((n, h, w, c) if last else shape[:ndim], dtype=DTYPES[code], device=self.device)
            dist.recv(t, self.prev, group=self.group)
            out.append(t.permute(0, 3, 1, 2) if last else t)
        return out

    def flush(self) -> None:
        for item in self.pending:
            if not isinstance(item, torch.Tensor):
                item.wait()
        self.pending = []


@dataclass(frozen=True)
class Placement:
    """Which blocks each pipeline process holds: `groups[p]` is position p's consecutive blocks."""

    groups: tuple[tuple[int, ...], ...]

    @property
    def processes(self) -> int:
        return len(self.groups)

    def stage(self, position: int) -> Stage:
        """The part of the decoupled stage that position trains: its blocks and their heads, on received input."""
        blocks = self.groups[position]
        first, last = blocks[0], blocks[-1]
        return Stage(
            index=0,
            name="decoupled",
            first=first,
            block=last,
            eval_heads=blocks,
            frozen_heads=(),
            cacheable=False,
            finishes_block=False,
            decoupled=True,
            receives=first > 0,
        )

    def to_json(self) -> list[list[int]]:
        return [list(g) for g in self.groups]

    @classmethod
    def from_json(cls, value, J: int) -> Placement:
        ok = isinstance(value, list) and all(isinstance(g, list) and g for g in value)
        groups = tuple(tuple(g) for g in value) if ok else ()
        if not groups or [j for g in groups for j in g] != list(range(J)):
            raise LayerwiseError(
                f"the run's pipeline grouping {value!r:.100} does not cover blocks 0..{J - 1} in order"
            )
        return cls(groups)


def balance(costs: list[float], processes: int) -> Placement:
    """Cut the blocks, in order, into `processes` groups whose costliest group costs the least (the one balanced
    cut, models.partition's; ties go to the earliest cuts)."""
    J = len(costs)
    if not 1 <= processes <= J:
        raise LayerwiseError(f"{processes} pipeline processes for {J} blocks: each process needs at least one block")
    ends = balanced_cut(costs, processes)
    return Placement(tuple(tuple(range(a, b)) for a, b in zip([0, *ends[:-1]], ends, strict=True)))


def measure_blocks(net: StagedNet, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> list[float]:
    """Seconds of one training step (forward, backward) of each block with its head, at the batch x (images),
    on copies of the modules: the network itself is not changed. The first step of each is a warm-up."""
    import copy

    costs = []
    for block, head in zip(net.blocks, net.heads, strict=True):
        block, head = copy.deepcopy(block).train(), copy.deepcopy(head).train()
        block.requires_grad_(True), head.requires_grad_(True)
        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            out = block(x.detach())
            torch.nn.functional.cross_entropy(head(out).float(), y).backward()
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - t0)
        costs.append(min(times[1:]))
        with torch.no_grad():
            x = out.detach()
    return costs


class ReplayBuffer:
    """The last `capacity` batches one pipeline boundary received (DGL's asynchronous variant), for a process
    whose upstream is slower than itself: it trains on the newest batch it has not trained on yet, else replays
    the least replayed, newest one (at most `reuse` times each) instead of waiting, and waits only when neither
    exists. A receiving thread `put`s batches as they arrive, and never waits for the trainer: when the buffer is
    full the most used (then oldest) batch is dropped, so memory stays at `capacity` batches whatever the speed
    difference (a fresh batch dropped unused is counted in `dropped`). `close` marks the upstream's epoch done:
    `take` then returns the fresh batches left and None after them.
    """

    def __init__(self, capacity: int, reuse: int):
        if capacity < 1 or reuse < 0:
            raise ValueError("a replay buffer holds at least one batch, and replays each at least 0 times")
        self.capacity, self.reuse = capacity, reuse
        self.entries: list[list] = []  # [x, y, steps trained on it, arrival number]
        self.arrived = self.dropped = self.replays = 0
        self.most = 0  # the most entries ever held at once
        self.done, self.error = False, None
        self.changed = threading.Condition()

    def put(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self.changed:
            self.entries.append([x, y, 0, self.arrived])
            self.arrived += 1
            if len(self.entries) > self.capacity:
                victim = max(range(len(self.entries)), key=lambda i: (self.entries[i][2], -self.entries[i][3]))
                self.dropped += self.entries.pop(victim)[2] == 0
            self.most = max(self.most, len(self.entries))
            self.changed.notify_all()

    def close(self, error: BaseException | None = None) -> None:
        with self.changed:
            self.done, self.error = True, error
            self.changed.notify_all()

    def take(self) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        """(x, y, whether it is fresh), or None once the upstream's epoch is done and no fresh batch is left."""
        with self.changed:
            while True:
                if self.error is not None:
                    raise self.error
                fresh = [e for e in self.entries if e[2] == 0]
                replayable = [e for e in self.entries if 1 <= e[2] <= self.reuse]
                if fresh or (replayable and not self.done):
                    entry = max(fresh, key=lambda e: e[3]) if fresh else min(replayable, key=lambda e: (e[2], -e[3]))
                    entry[2] += 1
                    self.replays += not fresh
                    return entry[0], entry[1], bool(fresh)
                if self.done:
                    return None
                self.changed.wait()


class Received:
    """The training batches of a pipeline process after the first: block `offset`'s input and the labels, received
    from the process before it, until it marks the epoch's end (the Loader protocol). With a
    replay buffer (train.replay = M > 0) a thread receives them into it while the process trains, and the process
    trains on replays while it waits (ReplayBuffer); `replays` and `dropped` count the epoch's."""

    def __init__(self, pipe: Pipe, source, offset: int, replay: int = 0, reuse: int = 1):
        self.pipe, self.source, self.offset, self.device = pipe, source, offset, pipe.device
        self.replay, self.reuse = replay, reuse
        self.replays = self.dropped = 0

    def __len__(self) -> int:
        return len(self.source)

    def global_batch(self, i: int) -> int:
        return self.source.global_batch(i)

    @property
    def num_examples(self) -> int:
        return self.source.num_examples

    def batches(self, seed: int = 0, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.replay:
            while (got := self.pipe.recv(2)) is not None:
                yield got[0], got[1]
            return
        buffer = ReplayBuffer(self.replay, self.reuse)

        def receive() -> None:
            try:
                while (got := self.pipe.recv(2)) is not None:
                    buffer.put(*got)
            except BaseException as e:  # noqa: BLE001 - the trainer raises it
                buffer.close(e)
            else:
                buffer.close()

        thread = threading.Thread(target=receive, name="layerwise-pipe-receive", daemon=True)
        thread.start()
        try:
            while (item := buffer.take()) is not None:
                yield item[0], item[1]
            thread.join()  # (on an error the thread may wait on a peer that is gone; it dies with the process)
        finally:
            self.replays, self.dropped = buffer.replays, buffer.dropped


def evaluate_pipelined(
    net: StagedNet,
    loader,
    stage: Stage,
    pipe: Pipe,
    where: Dist,
    ensemble: str = "logits",
    autocast=nullcontext,
    flip: bool = False,
) -> dict:
    """`layerwise.evaluate.evaluate` over every head 0..J-1 when this process holds only `stage`'s blocks: the
    first process reads the loader, each one runs its blocks and heads, adds its heads to the running ensemble and
    passes the output and the ensemble on. Counts are all-reduced, each head's row filled by its process."""
    was_training = net.training
    net.eval()
    J = net.J
    counts = torch.zeros(J, 5, dtype=torch.float64, device=pipe.device)
    n = 0
    batches = loader.batches() if stage.first == 0 else (pipe.recv(3) for _ in range(len(loader)))
    for item in batches:
        x, y, total = (*item, None) if stage.first == 0 else item
        if flip and stage.first == 0:  # the mirrored images travel with the images (evaluate's `flipped`)
            x = torch.cat([x, x.flip(-1)])
        with torch.no_grad(), autocast():
            for j in stage.trained_blocks:
                x = net.blocks[j](x)
                z = net.heads[j](x)
                z = (z[: len(y)] + z[len(y) :]) / 2 if flip else z
                total = add_to_ensemble(total, z, ensemble)
                counts[j] += torch.stack([*topk_correct(z.float(), y), *topk_correct(total, y), summed_loss(z, y)])
        if pipe.next is not None:
            pipe.send(x, y, total)
        n += len(y)
    pipe.flush()
    net.train(was_training)
    *flat, n = where.sum(torch.cat([counts.flatten(), counts.new_tensor([n if stage.first == 0 else 0])])).tolist()
    return figures(list(range(J)), flat, int(n))


def pipelined(where: Dist, cfg: RunConfig) -> Dist:
    """The Dist of a run: with train.placement=pipeline, the processes torchrun started form world / P replicas of
    a P-process pipeline (train.pipeline_processes; 0: one pipeline of every process). Rank r is position r % P of
    replica r // P. Refused in one line when there is a single process or P does not divide the processes."""
    if cfg.train.placement != "pipeline":
        return where
    P = cfg.train.pipeline_processes or where.world_size
    if not where.active or P < 2:
        raise LayerwiseError(
            "train.placement=pipeline runs one group of blocks per process: start it with torchrun "
            "--nproc-per-node N, and P = train.pipeline_processes (default N) between 2 and the number of blocks"
        )
    if where.world_size % P:
        raise LayerwiseError(
            f"train.pipeline_processes={P} must divide the {where.world_size} processes torchrun started (each "
            "replica of the pipeline has P of them)"
        )
    if cfg.train.replay and where.world_size > P:
        raise LayerwiseError(
            "train.replay cannot be combined with replicas of the pipeline (train.pipeline_processes below the "
            "processes): with replays the replicas train different numbers of steps, which DDP cannot all-reduce"
        )
    return replace(where, pipeline=P)


def pipeline_groups(where: Dist) -> tuple:
    """(this replica's pipeline group, this position's data-parallel group or None), made on every process in the
    same order, as torch.distributed.new_group requires."""
    P, R = where.pipeline, where.replicas
    pipes = [dist.new_group([r * P + p for p in range(P)]) for r in range(R)]
    replicas = [dist.new_group([r * P + p for r in range(R)]) for p in range(P)] if R > 1 else [None] * P
    return pipes[where.replica], replicas[where.position]


class GatheredState:
    """A state dict gathered from every pipeline process, for checkpoint_job (which asks for state_dict())."""

    def __init__(self, state: dict | None):
        self.state = state

    def state_dict(self) -> dict | None:
        return self.state


def gather_to_main(net: StagedNet, stage: Stage, optimizer, where: Dist) -> dict | None:
    """After an epoch: every process sends its blocks' and heads' weights and buffers and their optimizers' states
    to rank 0, which loads the weights into its network (where they sit on the CPU). Returns, on rank 0, the
    optimizer state of every block ({"blocks": {"j": state}}) for the checkpoint; None elsewhere. Replicas of a
    pipeline hold the same weights (DDP): rank 0 takes replica 0's."""
    from layerwise.train.checkpoint import cpu_snapshot

    prefixes = tuple(f"{kind}.{j}." for j in stage.trained_blocks for kind in ("blocks", "heads"))
    mine = {k: v for k, v in net.state_dict().items() if k.startswith(prefixes)}
    payload = (cpu_snapshot(mine), cpu_snapshot(optimizer.state_dict()["blocks"]))
    gathered = [None] * where.world_size if where.is_main else None
    dist.gather_object(payload, gathered, dst=0)
    if not where.is_main:
        return None
    own = net.state_dict()
    blocks = {}
    for weights, states in gathered[: where.pipeline]:  # replica 0's processes
        with torch.no_grad():
            for key, value in weights.items():
                own[key].copy_(value)
        blocks.update(states)
    return {"blocks": blocks}

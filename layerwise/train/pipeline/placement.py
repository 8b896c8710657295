"""Which blocks each pipeline process holds (Placement): one block each, the run's own when resuming, or groups of
balanced measured step time."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import torch

from layerwise.errors import LayerwiseError
from layerwise.models.partition import balanced_cut
from layerwise.models.staged import StagedNet
from layerwise.stages import Stage

log = logging.getLogger("layerwise")


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


def place_blocks(parts, P: int, resuming: bool) -> Placement:
    """A pipelined run's block groups (`parts`: train.runner.Parts): the run's own when resuming (run.json), one
    block per process when there are as many processes as blocks, else measured: rank 0 times each block's
    training step and cuts the blocks into groups of balanced time (balance)."""
    net, where, cfg = parts.net, parts.where, parts.cfg
    J = net.J
    if P > J:
        raise LayerwiseError(
            f"train.placement=pipeline: {P} processes for {J} blocks; start at most {J} (--nproc-per-node)"
        )
    if resuming:
        saved = where.from_main(parts.dir.read_info().get("pipeline") if where.is_main else None)
        placement = Placement.from_json(saved, J)
        if placement.processes != P:
            raise LayerwiseError(
                f"--resume: the run was pipelined over {placement.processes} processes per pipeline, not {P}; "
                f"resume it with train.pipeline_processes={placement.processes} (or as many processes)"
            )
        return placement
    if P == J:
        return Placement(tuple((j,) for j in range(J)))
    costs = None
    if where.is_main:
        train = parts.data.train
        images = train.normalize(train.images[:1]) if hasattr(train, "images") else None
        shape = tuple(images.shape[1:]) if images is not None else (cfg.model.in_channels,) + (cfg.data.image_size,) * 2
        batch = cfg.train.batch_size // (where.world_size // P)
        device = parts.precision.device
        x = torch.randn(batch, *shape, device=device)
        y = torch.randint(0, len(parts.data.classes), (batch,), device=device)
        with parts.precision.autocast():
            costs = measure_blocks(net, x, y)
        log.info("pipeline: step seconds per block %s", ", ".join(f"{c:.4f}" for c in costs))
    return balance(where.from_main(costs), P)

"""The training batches of a pipeline process after the first (Received), with DGL's replay buffer."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from layerwise.train.pipeline.pipe import Pipe


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

"""Tensors between neighbouring pipeline processes (Pipe), and the process groups of a pipeline."""

from __future__ import annotations

import torch
import torch.distributed as dist

from layerwise.errors import LayerwiseError

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

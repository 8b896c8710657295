"""Device selection and the run's Precision: bf16 autocast (train.precision), memory layout, cudnn autotuning."""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from layerwise.config import PRECISIONS
from layerwise.errors import LayerwiseError


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`, checked against what this machine has."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is None:
        raise LayerwiseError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LayerwiseError(f"device {name!r} requested but no CUDA GPU is available here; use --device cpu")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LayerwiseError(f"device {name!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
        if device.index is not None:
            torch.cuda.set_device(device)  # pinned memory and DataLoader pinning then use this GPU too
        return device
    return torch.device(name)


@dataclass(frozen=True)
class Precision:
    """How the run computes on its device, decided once: bf16 autocast or plain fp32, and the memory layout.

    `auto` is bf16 on a GPU and fp32 on the CPU. `bf16` also autocasts on the CPU, which (with channels_last)
    ran 2.6-4.0x faster than fp32 on a CPU with AMX (docs/benchmarks.md) and is slow on CPUs without bf16 units.
    """

    device: torch.device
    bf16: bool

    @property
    def channels_last(self) -> bool:
        """On a GPU, and under bf16 on the CPU, where oneDNN's bf16 convolutions are 1.35-1.6x faster in that
        layout (docs/benchmarks.md)."""
        return self.device.type == "cuda" or self.bf16

    @property
    def dtype(self) -> torch.dtype:
        """What the network's activations come out as (and a prefix cache stores)."""
        return torch.bfloat16 if self.bf16 else torch.float32

    def autocast(self) -> AbstractContextManager:
        """The context every forward pass runs in."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def __str__(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"


def precision_for(device: torch.device, name: str = "auto") -> Precision:
    """The Precision `name` (auto, fp32, bf16) means on this device; cudnn autotuning on a GPU."""
    if name not in PRECISIONS:
        raise LayerwiseError(f"precision must be {', '.join(PRECISIONS)} (got {name!r})")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Precision(device, bf16=name == "bf16" or (name == "auto" and device.type == "cuda"))

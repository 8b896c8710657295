"""Device selection and the fast path: bf16 autocast (train.precision), cudnn autotuning on a GPU."""

from __future__ import annotations

import functools
import re

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


def channels_last(device: torch.device, precision: str = "auto") -> bool:
    """Whether the network runs channels_last: on a GPU, and under bf16 on the CPU, where oneDNN's bf16
    convolutions are 1.35-1.6x faster in that layout (docs/benchmarks.md)."""
    return device.type == "cuda" or precision == "bf16"


def fast_path(device: torch.device, precision: str = "auto"):
    """The autocast context factory for `precision` on this device (None: plain fp32); cudnn autotuning on a GPU.

    `auto` is bf16 on a GPU and fp32 on the CPU. `bf16` also autocasts on the CPU, which (with channels_last)
    ran 2.6-4.0x faster than fp32 on a CPU with AMX (docs/benchmarks.md) and is slow on CPUs without bf16 units.
    """
    if precision not in PRECISIONS:
        raise LayerwiseError(f"precision must be {', '.join(PRECISIONS)} (got {precision!r})")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)

"""Device selection and the GPU fast path (bf16 autocast, cudnn autotuning)."""

from __future__ import annotations

import functools
import re

import torch

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


def fast_path(device: torch.device):
    """bf16 autocast and cudnn autotuning on a GPU; plain fp32 on the CPU, where bf16 convs are slow."""
    if device.type != "cuda":
        return None
    torch.backends.cudnn.benchmark = True
    return functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)

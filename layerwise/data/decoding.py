"""Where a streamed sample from shards is decoded and cropped (data.decode).

`cpu`: the reader that read it (a DataLoader worker) decodes it and draws its crop; a chunk handed to the
training process is the readers' uint8 crops. `gpu`: the reader checks the image's header (its size capped, as
everywhere) and passes a JPEG on still encoded; the training process decodes each chunk's JPEGs in one batched
`torchvision.io.decode_jpeg` on the GPU and applies the same transforms there, each image's crop drawn from the
same seed as in a reader, so only the decoder's rounding differs (nvJPEG against libjpeg). Images of other
formats are decoded by the reader and cropped on the GPU. The CPU's workers then only read tar members, and
the JPEG decoding that paces greedy ImageNet stages (docs/scaling.md) moves to the GPU.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from layerwise.data.images import checked_header, decode_bytes
from layerwise.errors import LayerwiseError


def seeded(transform: v2.Transform, image: torch.Tensor, seed: int) -> torch.Tensor:
    """transform(image) with the CPU generator seeded, and left as it was (the training process may read shards
    itself, and crops there on the GPU). torch.manual_seed would cost 100x more: it seeds every device's."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)


class Decoding(Protocol):
    """How a reader prepares a sample (`item`) and a chunk of them (`pack`), and how the training process turns a
    chunk into uint8 crops on its device (`unpack`)."""

    def item(self, raw: bytes, name: str, seed: int): ...

    def pack(self, items: list, seeds: list[int], names: list[str]): ...

    def unpack(self, packed, device: torch.device) -> torch.Tensor: ...


class CropInReader:
    """data.decode=cpu."""

    def __init__(self, transform: v2.Transform):
        self.transform = transform

    def item(self, raw: bytes, name: str, seed: int) -> torch.Tensor:
        return seeded(self.transform, decode_bytes(raw, name), seed)

    def pack(self, items: list[torch.Tensor], seeds: list[int], names: list[str]) -> torch.Tensor:
        return torch.stack(items)  # (B, C, H, W) uint8

    def unpack(self, packed: torch.Tensor, device: torch.device) -> torch.Tensor:
        return packed.to(device, non_blocking=True)


class CropOnDevice:
    """data.decode=gpu (any device torchvision's decode_jpeg takes; training asks for CUDA)."""

    def __init__(self, transform: v2.Transform):
        self.transform = transform

    def item(self, raw: bytes, name: str, seed: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """A JPEG's bytes as a 1-D uint8 tensor, any other image decoded; with the (H, W) its header gives."""
        header = checked_header(raw, name)
        size = (header.height, header.width)
        if header.format == "JPEG":
            return torch.frombuffer(bytearray(raw), dtype=torch.uint8), size
        return decode_bytes(raw, name), size

    def pack(self, items: list, seeds: list[int], names: list[str]) -> tuple:
        return [data for data, _ in items], [size for _, size in items], seeds, names

    def unpack(self, packed: tuple, device: torch.device) -> torch.Tensor:
        data, sizes, seeds, names = packed
        encoded = [i for i, d in enumerate(data) if d.dim() == 1]
        images = [d.to(device, non_blocking=True) for d in data]
        if encoded:
            try:
                decoded = decode_jpeg([data[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                raise LayerwiseError(
                    f"cannot decode the JPEGs {names[encoded[0]]} ... {names[encoded[-1]]} on {device}; find the "
                    "broken one with data.decode=cpu"
                ) from None
            for i, image in zip(encoded, decoded, strict=True):
                images[i] = image
        for image, size, name in zip(images, sizes, names, strict=True):
            if tuple(image.shape[1:]) != tuple(size):  # a worker hands (H, W) over as a list
                raise LayerwiseError(
                    f"cannot decode {name}: its header says {size[1]}x{size[0]} but it holds another size"
                )
        return torch.stack([seeded(self.transform, image, s) for image, s in zip(images, seeds, strict=True)])


def decoding_for(decode: str, transform: v2.Transform, device: torch.device) -> Decoding:
    """data.decode's way for a loader training on `device`."""
    if decode == "cpu":
        return CropInReader(transform)
    check_device(device)
    return CropOnDevice(transform)


def check_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise LayerwiseError(f"data.decode=gpu decodes on a CUDA device, and this run trains on {device}; remove it")

"""What an epoch does to each training image of in-memory data: crop, flip, cutout, mixing, and the targets.

`Augmentation` holds the settings (data.crop_padding, flip, cutout, mix, mix_alpha); its `draw` makes an epoch's
`EpochPlan` on the CPU, for every image at once, so every device sees the same batches and a run resumes exactly.
The plan is indexed by image (not by batch position), so a cache of augmented views reproduces an epoch exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional as F

from layerwise.config import DataConfig
from layerwise.errors import LayerwiseError


@dataclass(frozen=True)
class Augmentation:
    """The augmentation of the training images, from the data settings; `draw` makes an epoch's plan."""

    size: tuple[int, int]  # (H, W) of the images
    padding: int = 4  # data.crop_padding
    flip: str = "random"  # data.flip: random or alternate
    cutout: int = 0  # data.cutout: the square's side, 0 for none
    mix: str = "none"  # data.mix: none, mixup or cutmix
    alpha: float = 1.0  # data.mix_alpha
    classes: int = 0  # the columns of data.mix's targets
    padding_mode: str = "zeros"  # data.crop_padding_mode: zeros or reflect

    def __post_init__(self) -> None:
        if self.mix != "none" and self.classes < 2:
            raise LayerwiseError("data.mix needs the number of classes (MemoryLoader's classes) for its targets")

    @classmethod
    def from_config(cls, cfg: DataConfig, size: tuple[int, int], classes: int = 0) -> Augmentation:
        return cls(size, cfg.crop_padding, cfg.flip, cfg.cutout, cfg.mix, cfg.mix_alpha, classes, cfg.crop_padding_mode)

    def draw(self, n: int, generator: torch.Generator, epoch: int = 0) -> EpochPlan:
        """Epoch `epoch`'s plan for n images: crop offsets and flips, then what the later settings ask for (cutout
        centres, mixing), each drawn after the others so that those stay as they are. data.flip=alternate mirrors
        image i where i + epoch is odd, in place of the random flips (still drawn, so the later draws stay too)."""
        dy = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator)
        mirrored = torch.rand(n, generator=generator) < 0.5
        if self.flip == "alternate":
            mirrored = (torch.arange(n) + epoch) % 2 == 1
        cy = cx = None
        if self.cutout:
            cy = torch.randint(0, self.size[0], (n,), generator=generator)
            cx = torch.randint(0, self.size[1], (n,), generator=generator)
        partner = lam = box = None
        if self.mix != "none":
            partner, lam, box = mixing(n, generator, self.mix, self.alpha, self.size)
        return EpochPlan(self, dy, dx, mirrored, cy, cx, partner, lam, box)


class Normalizing(Protocol):
    """What the plan normalises with (loaders.Normalize): uint8 images -> float, in the memory format `layout`."""

    layout: torch.memory_format

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's draws for each of the N training images, and `view` and `targets` applying them to a batch."""

    how: Augmentation
    dy: torch.Tensor  # (N,) in [0, 2 * padding]
    dx: torch.Tensor  # (N,)
    flip: torch.Tensor  # (N,) bool
    cy: torch.Tensor | None = None  # (N,) cutout centres in [0, H) (data.cutout), or None
    cx: torch.Tensor | None = None  # (N,) in [0, W)
    partner: torch.Tensor | None = None  # (N,) the image each one is mixed with (data.mix), or None
    lam: torch.Tensor | None = None  # (N,) the image's own share of its mixed image and of its target
    box: torch.Tensor | None = None  # (N, 4) cutmix: rows [top, bottom) and columns [left, right) pasted in

    def to(self, device: torch.device) -> EpochPlan:
        fields = (self.dy, self.dx, self.flip, self.cy, self.cx, self.partner, self.lam, self.box)
        return EpochPlan(self.how, *(t.to(device) if t is not None else None for t in fields))

    def augmented(self, images: torch.Tensor, idx: torch.Tensor, normalize: Normalizing) -> torch.Tensor:
        """uint8 images[idx] (B, C, H, W) cropped, flipped, normalised, then cut out."""
        how = self.how
        x = normalize(
            flip(crop(images[idx], how.padding, self.dy[idx], self.dx[idx], how.padding_mode), self.flip[idx])
        )
        if not self.how.cutout:
            return x
        x = cut_out(x, self.how.cutout, self.cy[idx], self.cx[idx])
        return x.contiguous(memory_format=normalize.layout)  # masked_fill's result is in the contiguous layout

    def view(self, images: torch.Tensor, idx: torch.Tensor, normalize: Normalizing) -> torch.Tensor:
        """images[idx] as the epoch makes them, (B, C, H, W) float: each one augmented, then (data.mix) mixed with
        its partner, augmented as that image is in its own place."""
        x = self.augmented(images, idx, normalize)
        if self.partner is None:
            return x
        other = self.augmented(images, self.partner[idx], normalize)
        if self.box is None:  # mixup
            return torch.lerp(other, x, self.lam[idx].view(-1, 1, 1, 1).to(x.dtype))
        return torch.where(in_box(x.shape[-2:], self.box[idx]), other, x)

    def targets(self, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """labels[idx], (B,); with data.mix, (B, classes) class probabilities: lam on the image's label and
        1 - lam on its partner's."""
        y = labels[idx]
        if self.partner is None:
            return y
        own = F.one_hot(y, self.how.classes).float()
        other = F.one_hot(labels[self.partner[idx]], self.how.classes).float()
        return torch.lerp(other, own, self.lam[idx, None])


def mixing(
    n: int, generator: torch.Generator, mix: str, alpha: float, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """data.mix's draws for n images: each image's partner (a random permutation), its own share lam ~
    Beta(alpha, alpha), and for cutmix (Yun et al. 2019) the partner's box: sides H sqrt(1 - lam) and
    W sqrt(1 - lam) around a uniform centre, clipped at the border, after which lam is 1 - the box's area / HW."""
    partner = torch.randperm(n, generator=generator)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):  # Beta draws from the global CPU stream only: seed it from the plan
        torch.default_generator.manual_seed(seed)  # (torch.manual_seed would reseed the GPUs' streams too)
        lam = torch.distributions.Beta(alpha, alpha).sample((n,))
    if mix == "mixup":
        return partner, lam, None
    h, w = size
    cy = torch.randint(0, h, (n,), generator=generator)
    cx = torch.randint(0, w, (n,), generator=generator)
    half_h = (h * (1 - lam).sqrt() / 2).round().long()
    half_w = (w * (1 - lam).sqrt() / 2).round().long()
    box = torch.stack([cy - half_h, cy + half_h, cx - half_w, cx + half_w], 1)
    box[:, :2] = box[:, :2].clamp(0, h)
    box[:, 2:] = box[:, 2:].clamp(0, w)
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    return partner, 1 - area.float() / (h * w), box


def crop(x: torch.Tensor, padding: int, dy: torch.Tensor, dx: torch.Tensor, mode: str = "zeros") -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) with zero fill, or with mode="reflect" the image mirrored into the
    padding without repeating its edge (torch's reflect padding, as InfoPro pads), at per-image offsets (dy, dx)."""
    if padding == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4) if mode == "zeros" else reflected(x, padding)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    # Gather rows then columns: (B, C, H+2p, W+2p) -> (B, C, H, W+2p) -> (B, C, H, W).
    out = padded.gather(2, rows.expand(b, c, h, w + 2 * padding))
    return out.gather(3, cols.expand(b, c, h, w))


def reflected(x: torch.Tensor, padding: int) -> torch.Tensor:
    """x (B, C, H, W) of any dtype padded by `padding` on each side with its reflection about the edge pixels:
    (B, C, H + 2p, W + 2p), torch's reflect padding (which uint8 images do not have), p < H and p < W."""

    def mirror(n: int) -> torch.Tensor:
        i = torch.arange(-padding, n + padding, device=x.device).abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)

    h, w = x.shape[-2:]
    return x[:, :, mirror(h)][:, :, :, mirror(w)]


def cut_out(x: torch.Tensor, side: int, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """Cutout (DeVries & Taylor 2017): a side x side square centred at (cy, cx) set to 0, clipped at the border.
    On normalised images 0 is the data's mean colour."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device)[None, :] - (cy[:, None] - side // 2)  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] - (cx[:, None] - side // 2)  # (B, W)
    inside = ((rows >= 0) & (rows < side))[:, None, :, None] & ((cols >= 0) & (cols < side))[:, None, None, :]
    return x.masked_fill(inside, 0.0)


def in_box(size: torch.Size, box: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) masks, True inside each image's box (top, bottom, left, right), bottom and right excluded."""
    rows = torch.arange(size[0], device=box.device)[None, :]
    cols = torch.arange(size[1], device=box.device)[None, :]
    inside_rows = (rows >= box[:, :1]) & (rows < box[:, 1:2])  # (B, H)
    inside_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # (B, W)
    return inside_rows[:, None, :, None] & inside_cols[:, None, None, :]


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of the images where mask is True."""
    return torch.where(mask[:, None, None, None], x.flip(3), x)

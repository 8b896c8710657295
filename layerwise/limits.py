"""Limits on what layerwise reads from files it is given, and the environment variables that raise them.

Every file a user passes may come from someone else (a dataset, a run directory, an image to predict), so each
read is sized before it happens. The limits are environment variables rather than config keys: they apply to
every command alike (train, eval, predict, bench), reach DataLoader workers and torchrun's processes, and
changing one never changes what a run computes (resume compares the config). docs/security.md lists them.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from layerwise.errors import LayerwiseError

MiB = 2**20
GiB = 2**30

PIL_MAX_IMAGE_PIXELS = 89_478_485
"""PIL's own default (Image.MAX_IMAGE_PIXELS: a 1024 MiB 24-bit image), the reference for ours."""


@dataclass(frozen=True)
class Limit:
    env: str
    default: float
    unit: str
    """"bytes" (a number with an optional K, M or G binary suffix: 64M), "pixels" or "seconds"."""

    def get(self) -> float:
        text = os.environ.get(self.env)
        if text is None or not text.strip():
            return self.default
        return amount(text, self.unit, self.env)


def amount(text: str, unit: str, name: str) -> float:
    """A positive number of `unit` from text; bytes take a K, M or G binary suffix (64M). One line naming
    `name` (an environment variable, an option) otherwise."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([KMG]i?B?)?\s*", text, re.IGNORECASE)
    value = float(found.group(1)) if found else math.nan
    if found and found.group(2):
        if unit != "bytes":
            value = math.nan
        else:
            value *= 1024 ** ("KMG".index(found.group(2)[0].upper()) + 1)
    if not (math.isfinite(value) and value > 0):
        example = "64M, 2G" if unit == "bytes" else "1800"
        raise LayerwiseError(f"{name}={text!r} is not a positive number of {unit} (for example {example})")
    return value


MAX_IMAGE_PIXELS = Limit("LAYERWISE_MAX_IMAGE_PIXELS", PIL_MAX_IMAGE_PIXELS, "pixels")
"""Width x height of one decoded image (only the first frame of an animated one is decoded)."""
MAX_MEMBER_BYTES = Limit("LAYERWISE_MAX_MEMBER_BYTES", 64 * MiB, "bytes")
"""One file read into memory: an archive member, an image, a CIFAR-10 batch (31 MiB each in the real archive)."""
MAX_ARCHIVE_BYTES = Limit("LAYERWISE_MAX_ARCHIVE_BYTES", 8 * GiB, "bytes")
"""All the members read out of one archive, or extracted from it by `bench`."""
MAX_BUFFER_BYTES = Limit("LAYERWISE_MAX_BUFFER_BYTES", 1 * GiB, "bytes")
"""The encoded images one shard reader holds to shuffle (data.shuffle_buffer of them, at most this many bytes)."""
MAX_WEIGHTS_BYTES = Limit("LAYERWISE_MAX_WEIGHTS_BYTES", 2 * GiB, "bytes")
"""A model.weights file (timm): ConvNeXt-XL's are 1.4 GB."""
DIST_TIMEOUT = Limit("LAYERWISE_DIST_TIMEOUT", 1800, "seconds")
"""How long a collective waits for a peer process before giving up (PyTorch's own default: 30 minutes)."""


SMALL_FILE = MiB
"""config.yaml and other files a person writes: far more than any needs."""
RUN_FILE = 64 * MiB
"""classes.json, run.json, eval.json, early_exit.json, summary.json."""
METRICS_FILE = 256 * MiB
"""metrics.jsonl: about 500 bytes an epoch."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


class Budget:
    """The bytes one archive may still give: each member is checked against MAX_MEMBER_BYTES and the running total
    against MAX_ARCHIVE_BYTES before it is read (its size comes from its header)."""

    def __init__(self, archive: object):
        self.archive, self.used = archive, 0
        self.member_cap, self.total_cap = MAX_MEMBER_BYTES.get(), MAX_ARCHIVE_BYTES.get()

    def take(self, name: str, size: int) -> None:
        check_file_size(name, size, self.member_cap)
        self.used += size
        if self.used > self.total_cap:
            raise LayerwiseError(
                f"{self.archive} holds more than {MAX_ARCHIVE_BYTES.env}={human_bytes(self.total_cap)} of files; "
                f"raise {MAX_ARCHIVE_BYTES.env} if you trust it, or extract it to a folder"
            )


def check_file_size(name: object, size: int, cap: float | None = None, limit: Limit = MAX_MEMBER_BYTES) -> None:
    """Refuse a file over `cap` (default: `limit`'s value), naming the setting that raises it."""
    cap = limit.get() if cap is None else cap
    if size > cap:
        raise LayerwiseError(
            f"{name} is {human_bytes(size)}, more than {limit.env}={human_bytes(cap)}; raise {limit.env} if you "
            "trust the file"
        )

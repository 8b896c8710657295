"""The CIFAR-10 python archive (data_batch_1..5, test_batch, batches.meta), as a .tar.gz or extracted, and the
one-line error for any archive that cannot be read."""

from __future__ import annotations

import pickle
import tarfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from layerwise.errors import LayerwiseError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")


@contextmanager
def reading_archive(path: Path):
    """Turn the many ways a truncated or corrupt archive fails into one line."""
    try:
        yield
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise LayerwiseError(
            f"cannot read archive {path} ({e or type(e).__name__}); re-download it or pass an image folder"
        ) from None


def is_cifar_python(path: Path) -> bool:
    if path.is_dir():
        return (path / "data_batch_1").is_file() or (path / "cifar-10-batches-py" / "data_batch_1").is_file()
    if tarfile.is_tarfile(path):
        with reading_archive(path), tarfile.open(path) as tf:
            for member in tf:
                if Path(member.name).name == "data_batch_1":
                    return True
                if member.isfile() and member.name.lower().endswith(IMAGE_EXTENSIONS):
                    return False
    return False


def read_cifar_python(path: Path, train: bool) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(class names, (N, 3, 32, 32) uint8 images, (N,) int64 labels) of the training or the test batches."""
    wanted = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    blobs: dict[str, bytes] = {}
    if path.is_dir():
        root = path if (path / "data_batch_1").is_file() else path / "cifar-10-batches-py"
        for name in [*wanted, "batches.meta"]:
            if not (root / name).is_file():
                raise LayerwiseError(f"CIFAR-10 folder {root} lacks {name}; extract the whole cifar-10-python archive")
            blobs[name] = (root / name).read_bytes()
    else:
        with reading_archive(path), tarfile.open(path) as tf:
            for member in tf:
                if member.isfile() and Path(member.name).name in [*wanted, "batches.meta"]:
                    blobs[Path(member.name).name] = tf.extractfile(member).read()
        missing = [n for n in [*wanted, "batches.meta"] if n not in blobs]
        if missing:
            raise LayerwiseError(f"CIFAR-10 archive {path} lacks {missing[0]}; download it again (--download)")
    # The CIFAR-10 python format is pickled numpy arrays of plain types; this is the format's own reader.
    batches = [pickle.loads(blobs[name], encoding="bytes") for name in wanted]
    meta = pickle.loads(blobs["batches.meta"], encoding="bytes")
    classes = [c.decode() for c in meta[b"label_names"]]
    images = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([b[b"labels"] for b in batches])
    return classes, torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))

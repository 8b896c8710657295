"""Shared fixtures: tiny image datasets written to disk, and tiny configs that train in seconds."""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

CLASSES = ["cat", "dog", "ship"]


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (the BINSTRING opcodes), as the cPickle that made the real CIFAR-10 files did:
    Python 3 reads those back as bytes only when told encoding="bytes"."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def python2_pickle(obj) -> bytes:
    """`obj` pickled as the CIFAR-10 python archive's files are (protocol 2, keys and array data as Python 2 str)."""
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def make_image(label: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A (3, size, size) uint8 image whose mean colour depends on the label, so it can be learned."""
    base = torch.zeros(3, 1, 1)
    base[label % 3] = 200.0
    noise = torch.randint(0, 56, (3, size, size), generator=generator).float()
    return (base + noise).clamp(0, 255).to(torch.uint8)


def write_folder(
    root: Path, per_class: int = 8, size: int = 32, fmt: str = "jpg", classes=CLASSES, seed: int = 0
) -> Path:
    g = torch.Generator().manual_seed(seed)
    for label, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = make_image(label, size, g)
            data = encode_jpeg(img, quality=95) if fmt == "jpg" else encode_png(img)
            (folder / f"{i:03d}.{fmt}").write_bytes(bytes(data.numpy()))
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """ImageFolder layout: <root>/<class>/<image>.jpg, 3 classes x 16 images of 32x32."""
    return write_folder(tmp_path / "folder", per_class=16)


@pytest.fixture
def imagenet_folder(tmp_path: Path) -> Path:
    """ImageNet layout: train/ and val/ with class subfolders, 48x48 PNG images."""
    root = tmp_path / "imagenet"
    write_folder(root / "train", per_class=8, size=48, fmt="png")
    write_folder(root / "val", per_class=2, size=48, fmt="png", seed=1)
    return root


@pytest.fixture
def cifar_archive(tmp_path: Path) -> Path:
    """A CIFAR-10 python archive in the official format (.tar.gz with data_batch_1..5, test_batch)."""
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "cifar-src" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    names = [f"c{i}" for i in range(10)]
    for name, n in [*[(f"data_batch_{i}", 12) for i in range(1, 6)], ("test_batch", 20)]:
        labels = [i % 10 for i in range(n)]
        data = torch.stack([make_image(y, 32, g) for y in labels]).reshape(n, -1).numpy()
        (root / name).write_bytes(python2_pickle({b"data": np.asarray(data), b"labels": labels}))
    (root / "batches.meta").write_bytes(python2_pickle({b"label_names": [n.encode() for n in names]}))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="cifar-10-batches-py")
    return archive


def tiny_overrides(epochs: int = 1) -> list[str]:
    """--set arguments that shrink any CIFAR-style preset to seconds on a CPU."""
    return [
        f"train.epochs_per_block={epochs}",
        "train.batch_size=16",
        "train.train_eval_size=8",
        "train.device=cpu",
        "data.val_size=8",
    ]


class Interrupt(Exception):
    pass


def train_until_interrupted(cfg, out, data, epochs: int = 3) -> list[dict]:
    """Train, stopping (as an interruption would) after the metrics line of the run's epoch `epochs`; the rows."""
    from layerwise.train import train

    seen = []

    def stop(row):
        seen.append(row)
        if len(seen) == epochs:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, out, data, on_epoch_end=stop)
    return seen


def whole_and_resumed(cfg, root, data, epochs: int = 2) -> tuple[dict, dict, dict, dict]:
    """Train cfg uninterrupted in root/full, and in root/cut stopped after `epochs` epochs and resumed: (the
    whole run's summary, the resumed run's, the whole run's final weights, the resumed run's)."""
    from layerwise.rundir import RunDir, load_checkpoint
    from layerwise.train import train

    full = train(cfg, root / "full", data)
    train_until_interrupted(cfg, root / "cut", data, epochs=epochs)
    resumed = train(cfg, root / "cut", data, resume=True)
    _, a, _ = load_checkpoint(RunDir(root / "full").final)
    _, b, _ = load_checkpoint(RunDir(root / "cut").final)
    return full, resumed, a, b

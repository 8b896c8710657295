"""The CIFAR-10 python archive (data_batch_1..5, test_batch, batches.meta), as a .tar.gz or extracted, and the
one-line error for any archive that cannot be read.

The format is pickles of numpy arrays, and a pickle can name any function to call. These are read with an
unpickler that knows only the handful of names the format needs (numpy's array and dtype reconstruction, under
numpy 1's and numpy 2's module names); a file that asks for anything else is refused before it runs.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import tarfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerwise.data.images import IMAGE_EXTENSIONS
from layerwise.errors import LayerwiseError
from layerwise.limits import Budget

__all__ = ["IMAGE_EXTENSIONS", "is_cifar_python", "read_cifar_python", "reading_archive"]

IMAGE_BYTES = 3 * 32 * 32


@contextmanager
def reading_archive(path: Path):
    """Turn the many ways a truncated or corrupt archive fails into one line."""
    try:
        yield
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise LayerwiseError(
            f"cannot read archive {path} ({e or type(e).__name__}); re-download it or pass an image folder"
        ) from None


def _latin1(text: str, encoding: str) -> bytes:
    """What numpy's protocol-2 pickles call as _codecs.encode: their raw bytes, stored as a latin-1 str."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode with anything but a latin-1 string")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 names it _core, numpy 1 core; pickles use either
    reconstruct, frombuffer = core.multiarray._reconstruct, core.numeric._frombuffer
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy.core.numeric", "_frombuffer"): frombuffer,  # protocol 5 (numpy >= 1.16)
        ("numpy._core.numeric", "_frombuffer"): frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1,
    }


class CifarUnpickler(pickle.Unpickler):
    """Python 2's cPickle files (str read as bytes) and numpy 1 or 2 pickles, allowing only _allowed()'s names."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data), encoding="bytes")
        self.allowed = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which the format never needs")
        return found


def load_batch(data: bytes, name: str) -> dict:
    """One CIFAR-10 pickle as a dict; a one-line error naming the file if it is anything else. Nothing runs."""
    try:
        value = CifarUnpickler(data).load()
    except Exception as e:  # noqa: BLE001 - a foreign or hostile pickle fails in many ways; none may escape
        raise LayerwiseError(
            f"{name} is not a CIFAR-10 python batch ({one_reason(e)}); nothing in it was run"
        ) from None
    if not isinstance(value, dict):
        raise LayerwiseError(f"{name} is not a CIFAR-10 python batch (a {type(value).__name__}, not a dict)")
    return value


def one_reason(e: BaseException) -> str:
    text = str(e).splitlines()[0][:160] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_batch(batch: dict, name: str, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """((N, 3072) uint8 images, (N,) labels in 0..classes-1) of a batch, or a one-line error naming the file."""
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == IMAGE_BYTES
    ):
        raise LayerwiseError(f"{name}: b'data' must be an (N, 3072) uint8 array; the file is not CIFAR-10")
    if isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu":
        labels = labels.astype(np.int64)
    elif isinstance(labels, list) and all(type(v) is int for v in labels):
        labels = np.array(labels, dtype=np.int64)
    else:
        raise LayerwiseError(f"{name}: b'labels' must be a list of integers; the file is not CIFAR-10")
    if len(labels) != len(data) or (len(labels) and not (labels.min() >= 0 and labels.max() < classes)):
        raise LayerwiseError(
            f"{name}: {len(labels)} labels for {len(data)} images, or a label outside 0..{classes - 1}"
        )
    return data, labels


def check_meta(meta: dict, name: str) -> list[str]:
    names = meta.get(b"label_names")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, bytes) for n in names)):
        raise LayerwiseError(f"{name}: b'label_names' must be a list of at least 2 names; the file is not CIFAR-10")
    try:
        return [n.decode() for n in names]
    except UnicodeDecodeError:
        raise LayerwiseError(f"{name}: a class name is not UTF-8 text; the file is not CIFAR-10") from None


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
    budget = Budget(path)
    if path.is_dir():
        root = path if (path / "data_batch_1").is_file() else path / "cifar-10-batches-py"
        for name in [*wanted, "batches.meta"]:
            if not (root / name).is_file():
                raise LayerwiseError(f"CIFAR-10 folder {root} lacks {name}; extract the whole cifar-10-python archive")
            with open(root / name, "rb") as f:
                info = os.fstat(f.fileno())
                budget.take(str(root / name), info.st_size if stat.S_ISREG(info.st_mode) else 0)
                blobs[name] = f.read(info.st_size)
    else:
        with reading_archive(path), tarfile.open(path) as tf:
            for member in tf:
                if member.isfile() and Path(member.name).name in [*wanted, "batches.meta"]:
                    budget.take(f"{path}:{member.name}", member.size)  # before a byte of it is read
                    blobs[Path(member.name).name] = tf.extractfile(member).read()
        missing = [n for n in [*wanted, "batches.meta"] if n not in blobs]
        if missing:
            raise LayerwiseError(f"CIFAR-10 archive {path} lacks {missing[0]}; download it again (--download)")
    classes = check_meta(load_batch(blobs["batches.meta"], f"{path}:batches.meta"), f"{path}:batches.meta")
    batches = [check_batch(load_batch(blobs[n], f"{path}:{n}"), f"{path}:{n}", len(classes)) for n in wanted]
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([labels for _, labels in batches])
    return classes, torch.from_numpy(images.copy()), torch.from_numpy(labels)

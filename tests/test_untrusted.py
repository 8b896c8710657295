"""Hostile and odd files, made here: pickles that run code, archive members and images too large to read, animated
and palette images. Each gets its one-line error or its documented behaviour, and nothing runs."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import python2_pickle, write_folder
from PIL import Image
from torchvision.io import encode_png

from layerwise.cli import main
from layerwise.data.cifar import read_cifar_python
from layerwise.data.images import decode_bytes
from layerwise.data.sources import open_train
from layerwise.errors import LayerwiseError


class RunsCommand:
    """A pickle that calls os.system when loaded: what a hostile CIFAR-10 batch looks like."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cifar_folder(root: Path, batch: bytes | None = None, protocol: int | None = None) -> Path:
    """A CIFAR-10 folder whose data_batch_1 is `batch` (default: a good one); numpy pickles at `protocol`, or
    Python 2 ones when None."""
    root.mkdir(parents=True)
    dump = python2_pickle if protocol is None else (lambda obj: pickle.dumps(obj, protocol=protocol))
    g = np.random.default_rng(0)
    for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        data = g.integers(0, 256, (4, 3072), dtype=np.uint8)
        data[:, 0] = i  # tells the batches apart
        (root / name).write_bytes(dump({b"data": data, b"labels": [0, 1, 2, i % 3]}))
    (root / "batches.meta").write_bytes(dump({b"label_names": [b"cat", b"dog", b"ship"]}))
    if batch is not None:
        (root / "data_batch_1").write_bytes(batch)
    return root


@pytest.mark.parametrize("protocol", [None, 2, 4, 5])
def test_cifar_pickles_of_python2_and_numpy2_read_back(tmp_path, protocol):
    root = cifar_folder(tmp_path / "cifar", protocol=protocol)
    classes, images, labels = read_cifar_python(root, train=True)
    assert classes == ["cat", "dog", "ship"]
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert images[::4, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]  # data_batch_1..5 in order
    assert labels.tolist() == [0, 1, 2, 0, 0, 1, 2, 1, 0, 1, 2, 2, 0, 1, 2, 0, 0, 1, 2, 1]


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "marker"
    root = cifar_folder(tmp_path / "cifar", pickle.dumps({b"data": RunsCommand(marker), b"labels": []}))
    with pytest.raises(LayerwiseError, match=r"data_batch_1 is not a CIFAR-10 python batch .*posix.system"):
        read_cifar_python(root, train=True)
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="cifar-10-batches-py")
    for command in (["train", "--data", str(archive)], ["eval", "RUN", "--data", str(root)]):
        assert main([*command, "--out", str(tmp_path / "run")] if command[0] == "train" else command) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0, 1, 2, 0]}, "uint8 array"),
        ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 0]}, "uint8 array"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]}, "3 labels for 4 images"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 7]}, "outside 0..2"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": "0123"}, "list of integers"),
        ([1, 2, 3], "a list, not a dict"),
    ],
)
def test_cifar_batches_of_the_wrong_types_or_shapes_are_named(tmp_path, batch, message):
    root = cifar_folder(tmp_path / "cifar", pickle.dumps(batch))
    with pytest.raises(LayerwiseError, match=f"data_batch_1.*{message}"):
        read_cifar_python(root, train=True)


def test_archive_members_are_sized_before_they_are_read(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "images", per_class=4)
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname="images")
    assert open_train(archive, True, 32).train.images.shape[0] == 12  # within the default caps
    big = max(p.stat().st_size for p in folder.rglob("*.jpg"))
    monkeypatch.setenv("LAYERWISE_MAX_MEMBER_BYTES", str(big - 1))
    with pytest.raises(LayerwiseError, match=r"images\.tar\.gz:images/.*more than LAYERWISE_MAX_MEMBER_BYTES"):
        open_train(archive, True, 32)
    monkeypatch.setenv("LAYERWISE_MAX_MEMBER_BYTES", "1M")
    monkeypatch.setenv("LAYERWISE_MAX_ARCHIVE_BYTES", str(5 * big))
    with pytest.raises(LayerwiseError, match="holds more than LAYERWISE_MAX_ARCHIVE_BYTES"):
        open_train(archive, True, 32)
    monkeypatch.setenv("LAYERWISE_MAX_ARCHIVE_BYTES", "lots")
    with pytest.raises(LayerwiseError, match="LAYERWISE_MAX_ARCHIVE_BYTES='lots' is not a positive number"):
        open_train(archive, True, 32)


def test_an_oversized_cifar_member_is_refused_before_reading(tmp_path, monkeypatch):
    root = cifar_folder(tmp_path / "cifar")
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="cifar-10-batches-py")
    monkeypatch.setenv("LAYERWISE_MAX_MEMBER_BYTES", "1K")
    for source in (root, archive):
        with pytest.raises(LayerwiseError, match=r"more than LAYERWISE_MAX_MEMBER_BYTES=1\.0 KiB"):
            read_cifar_python(source, train=True)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height 1-bit pixels and holds none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_an_image_claiming_billions_of_pixels_is_refused_from_its_header(monkeypatch):
    with pytest.raises(LayerwiseError, match=r"bomb\.png is 100000x50000 = 5,000,000,000 pixels, more than"):
        decode_bytes(png_header(100_000, 50_000), "bomb.png")
    ok = bytes(encode_png(torch.zeros(3, 40, 30, dtype=torch.uint8)).numpy())
    assert decode_bytes(ok, "ok.png").shape == (3, 40, 30)
    monkeypatch.setenv("LAYERWISE_MAX_IMAGE_PIXELS", "1199")  # one below 40 x 30
    with pytest.raises(LayerwiseError, match="40 = 1,200 pixels, more than LAYERWISE_MAX_IMAGE_PIXELS=1,199"):
        decode_bytes(ok, "ok.png")


def pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def test_an_animated_gif_gives_its_first_frame_as_rgb():
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]
    frames = [Image.new("RGB", (12, 8), c).convert("P") for c in colours]
    gif = pil_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    x = decode_bytes(gif, "anim.gif")
    assert x.shape == (3, 8, 12) and x.dtype == torch.uint8
    assert x[:, 0, 0].tolist() == list(frames[0].convert("RGB").getpixel((0, 0)))
    assert x[0].float().mean() > 150 and x[1:].float().mean() < 50  # red, the first frame


def test_grey_palette_rgba_and_16_bit_images_become_rgb():
    grey = decode_bytes(pil_bytes(Image.new("L", (5, 4), 77), "PNG"), "grey.png")
    assert grey.shape == (3, 4, 5) and grey.unique().tolist() == [77]
    palette = Image.new("P", (5, 4))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 1), 1)
    x = decode_bytes(pil_bytes(palette, "PNG"), "palette.png")
    assert x[:, 1, 1].tolist() == [10, 20, 30] and x[:, 0, 0].tolist() == [0, 0, 0]
    rgba = decode_bytes(pil_bytes(Image.new("RGBA", (5, 4), (1, 2, 3, 4)), "PNG"), "rgba.png")
    assert rgba.shape == (3, 4, 5) and rgba[:, 2, 2].tolist() == [1, 2, 3]
    sixteen = decode_bytes(pil_bytes(Image.new("I;16", (5, 4), 65535), "PNG"), "deep.png")
    assert sixteen.dtype == torch.uint8 and sixteen.unique().tolist() == [255]


def test_a_file_that_is_no_image_is_named():
    with pytest.raises(LayerwiseError, match=r"cannot decode notes\.png: not a valid image"):
        decode_bytes(b"hello, this is text", "notes.png")


def test_a_config_asking_for_any_size_is_refused_before_anything_is_allocated(tmp_path, image_folder, capsys):
    huge = ["--set", "model.widths=[1000000, 1000000]", "--set", "model.downsample_at=[]", "--val-size", "8"]
    base = ["-q", "train", "--data", str(image_folder), "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "a"), *huge]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parameters" in err[0] and "more than this machine's" in err[0], err
    wide = ["--set", "data.image_size=32", "--batch-size", "100000000", "--val-size", "8"]
    assert main([*base, "--out", str(tmp_path / "b"), *wide]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs at least" in err[0] and "activations for a step of 100000000 images" in err[0]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_activation_bound_counts_each_trained_module_output():
    from layerwise.presets import load_preset
    from layerwise.sizing import trained_activations
    from layerwise.stages import plan_stages

    cfg = load_preset("demo")
    with torch.device("meta"):
        from layerwise.models import build_model

        net = build_model(cfg.model, 10)
    per_stage = trained_activations(net, plan_stages(net.J, "greedy"), 2, 3, 32, 4)
    # Block 0 of the demo: conv, BN, ReLU, each (2, w0, 32, 32) floats, before its head's modules.
    w0 = cfg.model.widths[0]
    assert per_stage[0] > 3 * 2 * w0 * 32 * 32 * 4
    assert per_stage[0] < 20 * 2 * w0 * 32 * 32 * 4

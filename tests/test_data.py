"""Data: sources and layouts, the held-out split, vectorised augmentation and both loaders."""

import tarfile

import pytest
import torch
from torch.nn import functional as F

from layerwise.config import DataConfig
from layerwise.data import build_data, build_eval_loader, hold_out, sample_path
from layerwise.data.loaders import Augmentation, MemoryLoader, crop, flip
from layerwise.data.sources import Decoded, open_train
from layerwise.errors import LayerwiseError

CPU = torch.device("cpu")


def test_random_crop_takes_windows_of_the_zero_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 255, (400, 3, 6, 6), dtype=torch.uint8)
    aug = Augmentation.draw(len(x), 2, g)
    out = crop(x, 2, aug.dy, aug.dx)
    padded = F.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 6, dx : dx + 6])
        ]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) == 25  # every offset of torchvision's RandomCrop(6, padding=2) occurs


def test_random_flip_flips_about_half():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2000 * 4, dtype=torch.float32).reshape(2000, 1, 1, 4)
    out = flip(x, Augmentation.draw(len(x), 0, g).flip)
    flipped = (out[:, 0, 0, 0] != x[:, 0, 0, 0]).float().mean().item()
    assert 0.45 < flipped < 0.55
    assert torch.equal(out.sort(-1).values, x)


def test_memory_loader_visits_every_image_once_and_is_seeded():
    data = Decoded(torch.randint(0, 255, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50))
    loader = MemoryLoader(data, 16, CPU, DataConfig(image_size=8, crop_padding=2), train=True)
    labels = torch.cat([y for _, y in loader.batches(seed=1)])
    assert sorted(labels.tolist()) == list(range(50)) and len(loader) == 4
    a = [x for x, _ in loader.batches(seed=1)]
    b = [x for x, _ in loader.batches(seed=1)]
    c = [x for x, _ in loader.batches(seed=2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=False))
    assert not torch.equal(a[0], c[0])


def test_normalisation_matches_torchvision():
    from torchvision.transforms import v2

    cfg = DataConfig(image_size=8, crop_padding=0)
    data = Decoded(torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), torch.arange(4))
    x, _ = next(MemoryLoader(data, 4, CPU, cfg, train=False).batches())
    ref = v2.Normalize(cfg.mean, cfg.std)(data.images.float() / 255)
    assert torch.allclose(x, ref, atol=1e-5)


def test_image_folder_holds_out_validation(image_folder):
    cfg = DataConfig(val_size=12)
    bundle = build_data(cfg, image_folder, 8, CPU, train_eval_size=6)
    assert bundle.classes == ["cat", "dog", "ship"]
    assert bundle.train.num_examples == 36 and bundle.val.num_examples == 12
    assert bundle.train_eval.num_examples == 6
    again = build_data(cfg, image_folder, 8, CPU)
    assert torch.equal(bundle.val.labels, again.val.labels)  # seeded split


def test_hold_out_fraction_and_bounds():
    data = Decoded(torch.zeros(10, 3, 2, 2, dtype=torch.uint8), torch.arange(10))
    train, val = hold_out(data, 0.2, seed=0)
    assert len(train) == 8 and len(val) == 2
    assert sorted(torch.cat([train.labels, val.labels]).tolist()) == list(range(10))
    with pytest.raises(LayerwiseError, match="val_size"):
        hold_out(data, 10, seed=0)


def test_imagenet_layout_streams_with_its_own_val(imagenet_folder):
    cfg = DataConfig(augment="imagenet", image_size=32, resize_size=40, workers=0, mean=[0.5] * 3, std=[0.25] * 3)
    bundle = build_data(cfg, imagenet_folder, 5, CPU)
    assert bundle.train.num_examples == 24 and bundle.val.num_examples == 6
    x, y = next(bundle.train.batches(seed=0))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (5,)


def test_cifar_python_archive(cifar_archive):
    src = open_train(cifar_archive, decode=True, size=32)
    assert len(src.train) == 60 and src.val is None and src.classes[0] == "c0"
    loader = build_eval_loader(DataConfig(), cifar_archive, src.classes, 8, CPU)
    assert loader.num_examples == 20  # test_batch


def test_builtin_sample():
    assert sample_path().stat().st_size < 6 * 2**20
    src = open_train(None, decode=True, size=32)
    assert len(src.classes) == 10 and len(src.train) >= 5000


def test_tar_archive_of_image_folder(tmp_path, image_folder):
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(image_folder, arcname="top/train")
    src = open_train(archive, decode=True, size=32)
    assert src.classes == ["cat", "dog", "ship"] and len(src.train) == 48


def test_eval_maps_classes_by_name(tmp_path, image_folder):
    from conftest import write_folder

    other = write_folder(tmp_path / "eval", per_class=2, classes=["ship", "cat"])
    loader = build_eval_loader(DataConfig(), other, ["cat", "dog", "ship"], 8, CPU)
    assert sorted(loader.labels.tolist()) == [0, 0, 2, 2]
    write_folder(tmp_path / "bad", per_class=1, classes=["cow"])
    with pytest.raises(LayerwiseError, match="'cow'"):
        build_eval_loader(DataConfig(), tmp_path / "bad", ["cat", "dog"], 8, CPU)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "is empty"),
        (lambda root: (root.mkdir(), (root / "a.jpg").write_bytes(b"x")), "no class subfolders"),
        (
            lambda root: (root.mkdir(), (root / "only").mkdir(), (root / "only" / "n.txt").write_text("hi")),
            "not an image",
        ),
    ],
)
def test_bad_data_paths(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(LayerwiseError, match=message):
        open_train(root, decode=True, size=32)


def test_corrupt_image_is_named(image_folder):
    bad = image_folder / "dog" / "001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(LayerwiseError, match=r"cannot decode .*001\.jpg"):
        open_train(image_folder, decode=True, size=32)


def test_mixed_sizes_need_imagenet_mode(tmp_path, image_folder):
    from conftest import write_folder

    write_folder(image_folder, per_class=1, size=40, classes=["cat"], seed=3)  # overwrites cat/000.jpg at 40 px
    with pytest.raises(LayerwiseError, match="image_size"):
        open_train(image_folder, decode=True, size=32)


def test_the_streamed_loader_draws_what_a_shuffling_dataloader_draws(imagenet_folder):
    """One process streams the batches torch's DataLoader(shuffle=True, generator seeded per epoch) gives: the
    same order and, with the same global seed, the same random crops."""
    from torch.utils.data import DataLoader

    from layerwise.data.loaders import StreamLoader

    files = open_train(imagenet_folder / "train", decode=False, size=32).train
    cfg = DataConfig(augment="imagenet", image_size=32, resize_size=40, workers=0)
    loader = StreamLoader(files, 5, torch.device("cpu"), cfg, True)
    reference = DataLoader(loader.dataset, 5, shuffle=True, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    expected = list(reference)
    torch.manual_seed(1)
    ours = list(loader.batches(seed=7))
    assert len(ours) == len(expected) == 5
    for (x, y), (ex, ey) in zip(ours, expected, strict=True):
        assert torch.equal(y, ey)
        assert torch.equal(x, loader.normalize(ex))

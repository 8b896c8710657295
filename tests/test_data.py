"""Data: sources and layouts, the held-out split, vectorised augmentation and both loaders."""

import re
import tarfile

import pytest
import torch
from torch.nn import functional as F

from layerwise.config import DataConfig
from layerwise.data import build_data, build_eval_loader, hold_out, sample_path
from layerwise.data.augment import Augmentation, crop, flip
from layerwise.data.loaders import Feed, MemoryLoader
from layerwise.data.sources import Decoded, Files, open_eval, open_train
from layerwise.errors import LayerwiseError

CPU = torch.device("cpu")


def test_random_crop_takes_windows_of_the_zero_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 255, (400, 3, 6, 6), dtype=torch.uint8)
    plan = Augmentation((6, 6), padding=2).draw(len(x), g)
    out = crop(x, 2, plan.dy, plan.dx)
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
    out = flip(x, Augmentation((1, 4), padding=0).draw(len(x), g).flip)
    flipped = (out[:, 0, 0, 0] != x[:, 0, 0, 0]).float().mean().item()
    assert 0.45 < flipped < 0.55
    assert torch.equal(out.sort(-1).values, x)


def test_memory_loader_visits_every_image_once_and_is_seeded():
    data = Decoded(torch.randint(0, 255, (50, 3, 8, 8), dtype=torch.uint8), torch.arange(50))
    loader = MemoryLoader(data, DataConfig(image_size=8, crop_padding=2), Feed(16, CPU, train=True))
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
    x, _ = next(MemoryLoader(data, cfg, Feed(4, CPU)).batches())
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


def test_a_held_out_split_of_streamed_files_keeps_each_path_with_its_label():
    files = Files([f"img{i}.png" for i in range(10)], [i % 3 for i in range(10)])
    train, val = hold_out(files, 0.3, seed=0)
    assert len(val) == 3 and sorted(train.paths + val.paths) == sorted(files.paths)
    for part in (train, val):
        assert part.labels == [int(p[3:-4]) % 3 for p in part.paths]


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
    loader = StreamLoader(files, cfg, Feed(5, torch.device("cpu"), True))
    reference = DataLoader(loader.dataset, 5, shuffle=True, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(1)
    expected = list(reference)
    torch.manual_seed(1)
    ours = list(loader.batches(seed=7))
    assert len(ours) == len(expected) == 5
    for (x, y), (ex, ey) in zip(ours, expected, strict=True):
        assert torch.equal(y, ey)
        assert torch.equal(x, loader.normalize(ex))


# ---- which split eval scores, and what reading skips


def test_eval_scores_the_test_split_else_val_and_refuses_train_only(tmp_path, imagenet_folder):
    from conftest import write_folder

    classes = ["cat", "dog", "ship"]
    assert len(open_eval(imagenet_folder, False, 32, classes)) == 6  # val/ (2 per class), not train/
    write_folder(imagenet_folder / "test", per_class=3, size=48, fmt="png", seed=2)
    test = open_eval(imagenet_folder, False, 32, classes)
    assert len(test) == 9 and all("/test/" in p for p in test.paths)
    only_train = write_folder(tmp_path / "only" / "train", per_class=1).parent
    with pytest.raises(LayerwiseError, match=rf"^{re.escape(str(only_train))} has only a train/ split;"):
        open_eval(only_train, False, 32, classes)


def test_an_unknown_eval_class_is_named_with_the_path_and_the_first_ten_classes(tmp_path):
    from conftest import write_folder

    folder = write_folder(tmp_path / "eval", per_class=1, classes=["cow"])
    classes = [f"k{i:02d}" for i in range(12)]
    message = f"class 'cow' in {folder} is not one the run was trained on ({', '.join(classes[:10])}...); remove it"
    with pytest.raises(LayerwiseError, match=f"^{re.escape(message)}$"):
        open_eval(folder, True, 32, classes)


def test_eval_images_must_have_the_runs_size(tmp_path):
    from conftest import write_folder

    folder = write_folder(tmp_path / "eval", per_class=1, size=40)
    with pytest.raises(LayerwiseError, match=r"is 40x40 but data\.image_size is 32"):
        open_eval(folder, True, 32, ["cat", "dog", "ship"])


def test_hidden_files_and_folders_are_skipped_in_folders_and_archives(tmp_path, image_folder):
    """Finder and notebook litter (.DS_Store first in sorted order, ._ resource forks, .ipynb_checkpoints/)."""
    (image_folder / "cat" / ".DS_Store").write_bytes(b"\x00\x01")
    (image_folder / "cat" / "._000.jpg").write_bytes(b"\x00\x05\x16\x07")
    (image_folder / ".ipynb_checkpoints" / "cow").mkdir(parents=True)
    (image_folder / ".ipynb_checkpoints" / "cow" / "x.jpg").write_bytes((image_folder / "cat" / "000.jpg").read_bytes())
    archive = tmp_path / "litter.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(image_folder, arcname="top")
    for source in (image_folder, archive):
        got = open_train(source, decode=True, size=32)
        assert got.classes == ["cat", "dog", "ship"] and len(got.train) == 48, source


def test_an_archive_without_a_top_folder_keeps_its_splits(tmp_path, imagenet_folder):
    archive = tmp_path / "splits.tar"
    with tarfile.open(archive, "w") as tf:
        for split in ("train", "val"):
            tf.add(imagenet_folder / split, arcname=split)
    got = open_train(archive, decode=True, size=48)
    assert len(got.train) == 24 and len(got.val) == 6


def test_an_archive_of_one_class_folder_scores_at_eval(tmp_path, image_folder):
    archive = tmp_path / "dogs.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(image_folder / "dog", arcname="dog")
    assert open_eval(archive, True, 32, ["cat", "dog", "ship"]).labels.tolist() == [1] * 16


def test_archive_errors_name_the_archive_and_the_member(tmp_path, image_folder):
    flat = tmp_path / "flat.tar"
    with tarfile.open(archive := flat, "w") as tf:
        tf.add(image_folder / "cat" / "000.jpg", arcname="000.jpg")
    with pytest.raises(LayerwiseError, match=rf"^{re.escape(str(flat))} holds images directly"):
        open_train(flat, decode=True, size=32)
    (image_folder / "dog" / "001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(image_folder, arcname="top")
    with pytest.raises(LayerwiseError, match=rf"^cannot decode {re.escape(str(archive))}:top/dog/001\.jpg:"):
        open_train(archive, decode=True, size=32)


def test_decoding_progress_says_which_split_it_decodes(imagenet_folder, monkeypatch):
    import layerwise.data.sources as sources

    seen = []
    monkeypatch.setattr(sources, "tqdm", lambda items, desc, **kw: seen.append(desc) or items)
    open_train(imagenet_folder, decode=True, size=48)
    open_eval(imagenet_folder, True, 48, ["cat", "dog", "ship"])
    assert seen == ["decoding train", "decoding val", "decoding eval"]


def test_folder_layout_errors_name_the_folder(tmp_path, image_folder):
    (image_folder / "stray.jpg").write_bytes((image_folder / "cat" / "000.jpg").read_bytes())
    with pytest.raises(LayerwiseError, match=rf"^{re.escape(str(image_folder))} holds images directly"):
        open_train(image_folder, decode=True, size=32)


def test_a_truncated_image_archive_is_one_error_naming_it(tmp_path, image_folder):
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(image_folder, arcname="top")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(LayerwiseError, match=rf"^cannot read archive {re.escape(str(cut))} "):
        open_train(cut, decode=True, size=32)


def test_a_cifar_class_the_run_lacks_is_named_with_the_archive(cifar_archive):
    classes = [f"c{i}" for i in range(9)]  # no c9
    with pytest.raises(LayerwiseError, match=rf"^class 'c9' in {re.escape(str(cifar_archive))} is not one"):
        open_eval(cifar_archive, True, 32, classes)


def test_every_loader_is_a_loader_and_counts_its_batches(tmp_path, image_folder):
    """48 images in batches of 16: 3 batches of 16; the prefix cache batches exactly as its images' loader."""
    from test_train import tiny_config

    from layerwise.data import build_data
    from layerwise.data.loaders import Loader, StreamLoader
    from layerwise.data.sources import Files
    from layerwise.device import Precision
    from layerwise.models import build_model
    from layerwise.train.cache import CachePlan, PrefixCache

    cfg = tiny_config(data={"val_size": 0})
    data = build_data(cfg.data, image_folder, 16, torch.device("cpu"))
    files = Files([str(p) for p in sorted(image_folder.rglob("*.jpg"))][:40], [0] * 40)
    stream = StreamLoader(files, cfg.data, Feed(16, torch.device("cpu"), train=True))
    net = build_model(cfg.model, 3)
    cache = PrefixCache(net, data.train, CachePlan(1, (0,), "host"), Precision(torch.device("cpu"), False))
    for loader, n, sizes in ((data.train, 48, [16, 16, 16]), (stream, 40, [16, 16, 8]), (cache, 48, [16, 16, 16])):
        assert isinstance(loader, Loader)
        assert (loader.num_examples, len(loader)) == (n, len(sizes))
        assert [loader.global_batch(i) for i in range(len(loader))] == sizes
    assert cache.offset == 1 and data.train.offset == 0

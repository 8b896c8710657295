"""Training and evaluating from shards (shard_loader.py): the deal of shards to processes and readers, the drops
and repeats that give every process its share of each batch, exact-once evaluation, corrupt samples, naming
shards by folder, pattern or list, and the same scores as the folder the shards were made from."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png

from layerwise.config import parse_assignment
from layerwise.data import build_data, build_eval_loader, decoding, shard_loader
from layerwise.data.decoding import CropInReader, CropOnDevice
from layerwise.data.loaders import Batching, Feed, imagenet_transform
from layerwise.data.shard_loader import (
    Shard,
    ShardLoader,
    Shards,
    expand,
    is_shard_spec,
    open_train_shards,
    quotas,
    shares,
    train_plan,
)
from layerwise.data.shards import read_shard, write_shards
from layerwise.distributed import SINGLE, Dist
from layerwise.errors import LayerwiseError
from layerwise.evaluate import evaluate
from layerwise.models import build_model
from layerwise.presets import resolve_config
from tests.shard_ids import config, seen, where_of, write_solid

CPU = torch.device("cpu")
EIGHT = 1024 + 8 * 2048
"""A shard size that holds exactly 8 samples of at most 512 bytes: each sample is 4 tar blocks (the image's header
and data, the class's header and data), a shard 2 end blocks more."""


@pytest.fixture(scope="module")
def solid(tmp_path_factory) -> Path:
    """Shards of 40 training images (5 shards of 8) and 12 validation images (6 + 6: a split's shards are equal to
    within one image), numbered 0..51."""
    root = tmp_path_factory.mktemp("solid")
    write_solid(root / "images", "train", range(40))
    write_solid(root / "images", "val", range(40, 52))
    index = write_shards(root / "images", root / "shards", EIGHT)
    assert [r["samples"] for r in index["splits"]["train"]] == [8] * 5
    assert [r["samples"] for r in index["splits"]["val"]] == [6, 6]
    return root / "shards"


def test_the_arithmetic_of_shares_and_quotas():
    """Worked by hand: 19 images in global batches of 4 are 4 batches of 4 and one of 3; two processes take 2 + 2
    of each and 2 + 1 of the last, 10 and 9 in all. Readers holding 5 and 3 samples deliver 10 as 5 + 3 and 2
    repeats of the first reader's, or 6 as 5 + 1."""
    batching = Batching(19, 4, Dist(0, 2))
    assert shares(batching, Dist(0, 2)) == [2, 2, 2, 2, 2]
    assert shares(batching, Dist(1, 2)) == [2, 2, 2, 2, 1]
    assert shares(Batching(19, 4), SINGLE) == [4, 4, 4, 4, 3]
    assert quotas([5, 3], 10) == [7, 3]
    assert quotas([5, 3], 6) == [5, 1]
    assert quotas([5, 3], 17) == [11, 6]


def loader(shards: Shards, batch: int, rank: int, world: int, train: bool = True, **cfg) -> ShardLoader:
    return ShardLoader(shards, config(**cfg), Feed(batch, CPU, train, where_of(rank, world)))


def test_one_process_sees_every_image_once_an_epoch_in_an_order_drawn_from_the_seed(solid):
    shards = open_train_shards(solid, False, 4).train
    one = loader(shards, 8, 0, 1, workers=2)
    first = seen(one, seed=1)
    assert [len(b) for b in first] == [8] * 5
    assert sorted(n for b in first for n in b) == list(range(40))
    assert seen(one, seed=1) == first  # the same seed: the same batches
    assert seen(one, seed=1, epoch=1) != first
    assert one.epoch_counts() == {"repeated": 0, "dropped": 0, "skipped": 0}
    # the same deal and buffer read in the main process (data.workers=0 is one reader) hold the same images
    assert sorted(n for b in seen(loader(shards, 8, 0, 1, workers=0), seed=1) for n in b) == list(range(40))


@pytest.mark.parametrize("buffer", [0, 1000])
def test_two_processes_with_two_readers_each_see_the_dataset_with_the_drops_and_repeats_counted(solid, buffer):
    """5 shards of 8 for 2 x 2 readers: four readers hold one shard, the first of them (process 0's) the fifth as
    well, whatever the order; each process owes 20 images (batches of 8, 4 + 4 each), so process 0 drops 4 of its 24
    and process 1 repeats 4 of its 16. Every epoch is 40 images, each at most twice; the uncounted ones are the
    dropped ones."""
    shards = open_train_shards(solid, False, 4).train
    for epoch in range(2):
        ranks = [loader(shards, 8, r, 2, workers=2, shuffle_buffer=buffer) for r in range(2)]
        batches = [seen(ld, seed=5, epoch=epoch) for ld in ranks]
        assert [[len(b) for b in mine] for mine in batches] == [[4] * 5, [4] * 5]
        counts = Counter(n for mine in batches for b in mine for n in b)
        assert sum(counts.values()) == 40 and max(counts.values()) == 2
        assert sum(c - 1 for c in counts.values()) == 4 and 40 - len(counts) == 4
        assert [ld.epoch_counts() for ld in ranks] == [
            {"repeated": 0, "dropped": 4, "skipped": 0},
            {"repeated": 4, "dropped": 0, "skipped": 0},
        ]
        process_1 = {n for b in batches[1] for n in b}
        assert len(process_1) == 16  # two whole shards, four of them twice
        assert {n for b in batches[0] for n in b}.isdisjoint(process_1)


def test_evaluation_scores_every_image_once_over_the_processes(solid):
    """The 6 + 6 validation images: each of two processes reads one shard; with three processes the third has
    none and still takes part."""
    val = build_data(config(), solid, 4, CPU).val  # the shards' val split
    assert sorted(n for b in seen(val) for n in b) == list(range(40, 52))
    for world in (2, 3):
        parts = [build_data(config(workers=1), solid, 4, CPU, where=Dist(r, world)).val for r in range(world)]
        got = [n for p in parts for b in seen(p) for n in b]
        assert sorted(got) == list(range(40, 52))
    assert [len(p.shards) for p in parts] == [6, 6, 0]


def test_more_readers_than_shards_is_one_line(solid):
    shards = open_train_shards(solid, False, 4).train
    with pytest.raises(LayerwiseError, match=r"5 shards cannot give each of 2 process\(es\) x 3 reader\(s\) one"):
        loader(shards, 8, 0, 2, workers=3)


def test_a_corrupt_sample_stops_the_epoch_or_is_skipped_and_counted(tmp_path):
    write_solid(tmp_path / "images", "train", range(16))
    (tmp_path / "images" / "train" / "b" / "0004.png").write_bytes(b"\x89PNG not really")
    write_shards(tmp_path / "images", tmp_path / "shards", EIGHT)
    shards = open_train_shards(tmp_path / "shards", False, 4).train
    with pytest.raises(LayerwiseError, match=r"cannot decode .*train-00000\d\.tar:000000\d\d: not a valid image"):
        seen(loader(shards, 4, 0, 1, workers=0))
    skipping = loader(shards, 4, 0, 1, workers=2, corrupt="skip")
    got = [n for b in seen(skipping) for n in b]
    assert len(got) == 16 and 4 not in got  # the reader's next sample takes its place: one image twice
    assert len(set(got)) == 15
    assert skipping.epoch_counts() == {"repeated": 0, "dropped": 0, "skipped": 1}


def test_a_pattern_or_a_list_names_shards_and_a_stray_name_is_one_line(solid, tmp_path):
    assert expand("s/train-{000003..000005}.tar") == [f"s/train-{i:06d}.tar" for i in (3, 4, 5)]
    for bad in ("s/train-{3..1}.tar", "s/{0..1}-{0..1}.tar", "s/train-{a..b}.tar"):
        with pytest.raises(LayerwiseError, match=r"shard pattern|range must run upward"):
            expand(bad)
    source = open_train_shards(f"{solid}/train-{{000001..000003}}.tar", False, 4)
    assert len(source.train) == 24 and source.val is None
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# two of them\n{solid}/train-000000.tar\n\n{solid}/train-000004.tar\n")
    assert is_shard_spec(listing) and is_shard_spec(solid) and not is_shard_spec(tmp_path)
    assert len(open_train_shards(listing, False, 4).train) == 16
    with pytest.raises(LayerwiseError, match=r"train-000005\.tar is not a train shard of"):
        open_train_shards(f"{solid}/train-{{000003..000009}}.tar", False, 4)
    with pytest.raises(LayerwiseError, match="cannot hold out random images"):
        build_data(config(val_size=0.1), f"{solid}/train-{{000000..000004}}.tar", 8, CPU)


@pytest.mark.parametrize("augment", ["imagenet", "cifar"])
def test_evaluating_on_shards_gives_the_scores_of_the_folder_they_were_made_from(imagenet_folder, tmp_path, augment):
    """A network scored on the val/ folder and on the val shards made from it: the same images, in another order,
    so the same counts and (up to the order of the sums) the same loss."""
    write_shards(imagenet_folder, tmp_path / "shards", 16384)
    streamed = ["data.resize_size=48", "data.workers=2"] if augment == "imagenet" else []
    sizes = ["data.image_size=48", *streamed]
    cfg = resolve_config("demo", None, [parse_assignment(a) for a in (f"data.augment={augment}", *sizes)])
    torch.manual_seed(0)
    net = build_model(cfg.model, 3, 48).eval()
    scores = []
    for path in (imagenet_folder, tmp_path / "shards"):
        eval_loader = build_eval_loader(cfg.data, path, ["cat", "dog", "ship"], 4, CPU)
        scores.append(evaluate(net, eval_loader, list(range(net.J))))
    folder, shards = scores
    assert folder["n"] == shards["n"] == 6
    assert folder["blocks"] == shards["blocks"]
    assert folder["loss"] == pytest.approx(shards["loss"], rel=1e-5)


def test_two_torchrun_processes_with_two_workers_each_read_the_dataset(solid, tmp_path):
    """The deal under torchrun (gloo): as in one process (the test above), and the same in both epochs' counts."""
    script = Path(__file__).with_name("shard_ids.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(script), str(solid), str(tmp_path), "8"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        counts = Counter(n for r in ranks for b in r["train"][epoch] for n in b)
        assert sum(counts.values()) == 40 and 40 - len(counts) == 4 and max(counts.values()) == 2
        assert all(len(b) == 4 for r in ranks for b in r["train"][epoch])
    assert [r["counts"] for r in ranks] == [
        {"repeated": 0, "dropped": 4, "skipped": 0},
        {"repeated": 4, "dropped": 0, "skipped": 0},
    ]
    assert sorted(n for r in ranks for b in r["val"] for n in b) == list(range(40, 52))
    assert ranks[0]["train"][0] != ranks[0]["train"][1]


def test_a_run_on_shards_counts_the_skipped_samples_in_its_metrics_and_summary(tmp_path):
    """One corrupt training sample, data.corrupt=skip: every epoch of every stage skips it once."""
    from layerwise.cli import main

    write_solid(tmp_path / "images", "train", range(32))
    write_solid(tmp_path / "images", "val", range(32, 40))
    (tmp_path / "images" / "train" / "b" / "0007.png").write_bytes(b"not a png")
    write_shards(tmp_path / "images", tmp_path / "shards", EIGHT)
    settings = ["model.widths=[8,8,16]", "model.downsample_at=[2]", "train.epochs_per_block=2", "train.batch_size=8",
                "train.device=cpu", "train.train_eval_size=0", "data.augment=imagenet", "data.image_size=8",
                "data.resize_size=8", "data.workers=2", "data.corrupt=skip"]  # fmt: skip
    out = tmp_path / "run"
    args = ["-q", "train", "--out", str(out), "--data", str(tmp_path / "shards")]
    assert main([*args, *(a for s in settings for a in ("--set", s))]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["data"] == {"repeated": 0, "dropped": 0, "skipped": 1} for r in rows)
    assert json.loads((out / "summary.json").read_text())["data"] == {"repeated": 0, "dropped": 0, "skipped": 6}


def jpeg_and_png_samples(image_folder: Path) -> list[tuple[bytes, str]]:
    files = sorted(image_folder.glob("*/*.jpg"))[:6]
    png = encode_png(torch.arange(3 * 20 * 28, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 20, 28))
    return [(f.read_bytes(), f.name) for f in files] + [(bytes(png.numpy()), "odd.png")]


def test_decoding_on_the_device_crops_as_the_reader_does(image_folder):
    """data.decode=gpu's plumbing on the CPU: the batched decode_jpeg and the crops drawn from the same seeds give
    exactly the reader's crops (torchvision's decode and v2 transforms), JPEGs and a PNG alike."""
    transform = imagenet_transform(config(image_size=24, resize_size=32), train=True)
    reader, device = CropInReader(transform), CropOnDevice(transform)
    samples = jpeg_and_png_samples(image_folder)
    seeds = list(range(100, 100 + len(samples)))
    names = [name for _, name in samples]
    crops = reader.unpack(
        reader.pack([reader.item(r, n, s) for (r, n), s in zip(samples, seeds, strict=True)], seeds, names), CPU
    )
    items = [device.item(r, n, s) for (r, n), s in zip(samples, seeds, strict=True)]
    assert [d.dim() for d, _ in items] == [1] * 6 + [3]  # JPEGs stay encoded, the PNG is decoded by the reader
    on_device = device.unpack(device.pack(items, seeds, names), CPU)
    assert on_device.shape == (7, 3, 24, 24) and torch.equal(on_device, crops)
    shifted = device.unpack(device.pack(items, [s + 1 for s in seeds], names), CPU)
    assert not torch.equal(shifted, crops)  # the seeds draw the crops


def test_a_shard_loader_decoding_on_the_device_yields_the_batches_of_one_decoding_in_its_workers(
    image_folder, tmp_path, monkeypatch
):
    """The whole loader with data.decode=gpu, its device check lifted so that the CPU stands in for the GPU."""
    write_shards(image_folder, tmp_path / "shards", 16 * 1024)
    shards = open_train_shards(tmp_path / "shards", False, 24).train
    feed = Feed(8, CPU, True)
    cpu = list(ShardLoader(shards, config(image_size=24, resize_size=32), feed).batches(seed=4))
    monkeypatch.setattr(decoding, "check_device", lambda device: None)
    gpu = list(ShardLoader(shards, config(image_size=24, resize_size=32, decode="gpu"), feed).batches(seed=4))
    assert len(cpu) == len(gpu) == 6
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(cpu, gpu, strict=True))


def test_decoding_on_the_gpu_is_refused_where_it_cannot_run(image_folder, tmp_path):
    write_shards(image_folder, tmp_path / "shards", 16 * 1024)
    with pytest.raises(LayerwiseError, match=r"data\.decode=gpu decodes on a CUDA device, and this run trains on cpu"):
        build_data(config(decode="gpu", val_size=0), tmp_path / "shards", 8, CPU)
    for setting in ({"decode": "gpu"}, {"shuffle_buffer": 10}, {"corrupt": "skip"}):
        with pytest.raises(LayerwiseError, match=r"data\.\w+=\w+ is for shards \(layerwise shard\), not an image"):
            build_data(config(val_size=8, **setting), image_folder, 8, CPU)
    with pytest.raises(LayerwiseError, match=r"data\.decode has no effect here"):
        resolve_config("demo", None, [parse_assignment("data.decode=gpu")])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decoding_on_the_gpu_gives_the_workers_labels_and_nearly_their_pixels(image_folder, tmp_path):
    """nvJPEG and libjpeg round differently: the same crops, pixels within a few levels."""
    write_shards(image_folder, tmp_path / "shards", 16 * 1024)
    shards = open_train_shards(tmp_path / "shards", False, 24).train
    cuda = torch.device("cuda")
    cfg = config(image_size=24, resize_size=32)
    cpu = list(ShardLoader(shards, cfg, Feed(8, cuda, True)).batches(seed=4))
    gpu = list(ShardLoader(shards, config(image_size=24, resize_size=32, decode="gpu"), Feed(8, cuda, True)).batches(4))
    for (a, ya), (b, yb) in zip(cpu, gpu, strict=True):
        assert torch.equal(ya, yb)
        assert (a - b).abs().mean() * 255 < 3


def test_a_deal_that_would_show_images_more_than_twice_is_refused_on_every_process():
    """Shards of 10, 10, 10, 10 and 1 for 5 processes: whichever process gets the shard of 1 owes 8 or 9 images."""
    shards = Shards(tuple(Shard(Path(f"s{i}.tar"), n, 10 * i) for i, n in enumerate([10, 10, 10, 10, 1])), (0, 1))
    for rank in range(5):
        where = Dist(rank, 5)
        with pytest.raises(LayerwiseError, match=r"gives process \d shards of 1 images for its [89]"):
            train_plan(shards, 1, Batching(41, 5, where), where, seed=0)
    assert ShardLoader(shards, config(workers=1), Feed(5, CPU, True, Dist(0, 5))).epoch_counts() == {
        "repeated": 0, "dropped": 0, "skipped": 0}  # fmt: skip


def test_evaluation_skips_a_corrupt_sample_without_showing_another_twice(tmp_path):
    write_solid(tmp_path / "images", "train", range(16))
    write_solid(tmp_path / "images", "val", range(16, 32))
    (tmp_path / "images" / "val" / "b" / "0025.png").write_bytes(b"not a png")
    write_shards(tmp_path / "images", tmp_path / "shards", EIGHT)
    val = build_data(config(corrupt="skip"), tmp_path / "shards", 4, CPU).val
    got = [n for b in seen(val) for n in b]
    assert sorted(got) == [n for n in range(16, 32) if n != 25]
    assert val.epoch_counts()["skipped"] == 1


def test_a_shard_with_fewer_samples_than_its_index_says_is_one_line(solid, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for f in solid.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    index = json.loads((folder / "index.json").read_text())
    index["splits"]["train"][0]["samples"] = 9
    (folder / "index.json").write_text(json.dumps(index))
    shards = open_train_shards(folder, False, 4).train
    with pytest.raises(LayerwiseError, match=r"train-000000\.tar holds 8 samples where index\.json says 9"):
        seen(loader(shards, 8, 0, 1, workers=0))


def test_an_extended_tar_header_is_refused_before_its_body_is_read(tmp_path):
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("00000000.jpg")
        info.pax_headers = {"comment": "x" * 100_000}
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(LayerwiseError, match=r"pax\.tar is unreadable after sample None \(.*extended or special"):
        list(read_shard(path, 3))


def test_a_rerun_on_a_changed_source_keeps_no_shard_of_the_old_plan(tmp_path):
    """Solid PNGs all weigh the same, so a shard of the old source has the new plan's member names and sizes: the
    plan's digests tell them apart, and the result is what a fresh run writes."""
    write_solid(tmp_path / "images", "train", range(40))
    write_shards(tmp_path / "images", tmp_path / "shards", EIGHT)
    write_solid(tmp_path / "images", "train", range(40, 48))
    write_shards(tmp_path / "images", tmp_path / "shards", EIGHT)
    write_shards(tmp_path / "images", tmp_path / "fresh", EIGHT)
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").glob("*.tar")} == {
        p.name: p.read_bytes() for p in (tmp_path / "fresh").glob("*.tar")
    }


def test_only_shards_are_taken_for_shards(solid, tmp_path, image_folder):
    odd = tmp_path / "odd{0..1}"
    odd.mkdir()
    assert not is_shard_spec(odd) and not is_shard_spec(image_folder)
    (image_folder / "index.json").write_text('{"a stray": "file"}')
    assert not is_shard_spec(image_folder)
    assert is_shard_spec(f"{solid}/train-{{000000..000001}}.tar") and not is_shard_spec(tmp_path / "no{such}")
    listing = tmp_path / "twice.txt"
    listing.write_text(f"{solid}/train-000000.tar\n{solid}/train-000000.tar\n")
    with pytest.raises(LayerwiseError, match="names a shard twice"):
        open_train_shards(listing, False, 4)


@pytest.mark.parametrize("buffer", [0, 1000])
def test_the_batches_are_the_readers_not_the_cpus(tmp_path, monkeypatch, buffer):
    """Four readers run by 4, 2 or 1 worker processes (data.workers lowered to the CPUs): the same batches. 7
    shards of 8 leave one reader with 8 images and three with 16, in chunks of 2 (batches of 2), so one reader ends
    4 chunks early and from there the DataLoader interleaves the workers' chunks otherwise than the readers' order
    (without in_reader_order this test fails)."""
    write_solid(tmp_path / "images", "train", range(56))
    write_shards(tmp_path / "images", tmp_path / "shards", EIGHT)
    shards = open_train_shards(tmp_path / "shards", False, 4).train
    got = []
    for workers in (4, 2, 1):
        monkeypatch.setattr(shard_loader, "usable_workers", lambda asked, workers=workers: workers)
        one = loader(shards, 2, 0, 1, workers=4, shuffle_buffer=buffer)
        assert one.workers == workers
        got.append(seen(one, seed=2))
    assert got[0] == got[1] == got[2]

"""`layerwise shard`: tar shards in WebDataset's format with an index, written resumably and byte-identically, read
back sample by sample under the untrusted-input rules."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from layerwise.cli import main
from layerwise.data.cifar import read_cifar_python
from layerwise.data.images import decode_bytes
from layerwise.data.shards import read_index, read_shard, write_shards
from layerwise.errors import LayerwiseError


def everything(folder: Path, split: str) -> list[tuple[str, bytes, int]]:
    index = read_index(folder)
    return [s for row in index["splits"][split] for s in read_shard(folder / row["name"], len(index["classes"]))]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_an_image_folder_comes_back_byte_for_byte_with_its_labels(image_folder, tmp_path):
    """48 JPEGs of 3 classes in shards of at most 16 KiB: every sample is its source file's bytes, labelled with
    the class folder's index, in the order torch.randperm draws from the seed (not the folder's, class by class);
    the index counts them."""
    index = write_shards(image_folder, tmp_path / "shards", 16 * 1024, seed=5)
    files = sorted(image_folder.glob("*/*.jpg"))
    order = torch.randperm(48, generator=torch.Generator().manual_seed(5)).tolist()
    assert order != sorted(order)
    got = everything(tmp_path / "shards", "train")
    assert [data for _, data, _ in got] == [files[i].read_bytes() for i in order]
    classes = sorted(p.name for p in image_folder.iterdir())
    assert [label for _, _, label in got] == [classes.index(files[i].parent.name) for i in order]
    assert [key for key, _, _ in got] == [f"{i:08d}" for i in range(48)]
    rows = index["splits"]["train"]
    assert len(rows) > 2 and sum(r["samples"] for r in rows) == 48
    assert all(r["bytes"] <= 16 * 1024 + 10240 for r in rows)  # tar pads a file to its 10 KiB record
    assert json.loads((tmp_path / "shards" / "classes.json").read_text()) == classes == index["classes"]


def test_a_rerun_keeps_whole_shards_and_rewrites_the_rest_identically(image_folder, tmp_path):
    out = tmp_path / "shards"
    write_shards(image_folder, out, 16 * 1024)
    first = digests(out)
    names = sorted(first)
    (out / names[0]).unlink()  # lost
    (out / names[1]).write_bytes((out / names[1]).read_bytes()[:3000])  # cut short by an interruption
    kept = (out / names[2]).stat().st_mtime_ns
    write_shards(image_folder, out, 16 * 1024)
    assert digests(out) == first
    assert (out / names[2]).stat().st_mtime_ns == kept
    write_shards(image_folder, out, 16 * 1024, seed=1)  # another order: every shard is rewritten
    assert not set(digests(out).items()) & set(first.items())


def test_the_imagenet_layout_and_a_cifar_archive_keep_their_splits(imagenet_folder, cifar_archive, tmp_path):
    """train/ and val/ become train and val shards; a CIFAR-10 archive's batches become lossless PNGs whose
    pixels are the archive's, its test batch the test split."""
    index = write_shards(imagenet_folder, tmp_path / "imagenet", 1 << 20)
    assert {s: sum(r["samples"] for r in rows) for s, rows in index["splits"].items()} == {"train": 24, "val": 6}
    write_shards(cifar_archive, tmp_path / "cifar", 1 << 20)
    g = torch.Generator().manual_seed(0)  # the default seed's order, split after split
    for split, train in (("train", True), ("test", False)):
        _, images, labels = read_cifar_python(cifar_archive, train)
        order = torch.randperm(len(labels), generator=g)
        got = everything(tmp_path / "cifar", split)
        assert torch.equal(torch.stack([decode_bytes(d, k) for k, d, _ in got]), images[order])
        assert [label for _, _, label in got] == labels[order].tolist()


def shard_of(members: list[tuple[str, bytes]], path: Path, kind: bytes = tarfile.REGTYPE) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.type = len(data), kind
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("../../etc/passwd", b"x")], r"unexpected member '\.\./\.\./etc/passwd'"),
        ([("00000000.jpg", b"x"), ("00000001.cls", b"0")], "sample 00000000 is incomplete"),
        ([("00000000.jpg", b"x")], "sample 00000000 is incomplete"),
        ([("00000000.jpg", b"x"), ("00000000.cls", b"7")], "no class index below 3"),
        ([("00000000.jpg", b"x"), ("00000000.png", b"x")], "holds two images"),
        ([("00000000.jpg", b"x" * 5000), ("00000000.cls", b"0")], r"more than LAYERWISE_MAX_MEMBER_BYTES"),
    ],
)
def test_a_shard_that_is_not_whole_samples_is_one_line(tmp_path, monkeypatch, members, message):
    monkeypatch.setenv("LAYERWISE_MAX_MEMBER_BYTES", "4K")
    path = shard_of(members, tmp_path / "bad.tar")
    with pytest.raises(LayerwiseError, match=message) as info:
        list(read_shard(path, 3))
    assert "\n" not in str(info.value)


def test_a_link_or_a_truncated_shard_is_refused(image_folder, tmp_path):
    link = shard_of([("00000000.jpg", b"")], tmp_path / "link.tar", kind=tarfile.SYMTYPE)
    with pytest.raises(LayerwiseError, match="unexpected member"):
        list(read_shard(link, 3))
    write_shards(image_folder, tmp_path / "shards", 1 << 20)
    whole = tmp_path / "shards" / "train-000000.tar"
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[:5000])
    with pytest.raises(LayerwiseError, match=r"cut\.tar is unreadable after sample"):
        list(read_shard(cut, 3))


def test_an_index_that_is_not_ours_is_one_line(tmp_path):
    rows = [{"name": "../x.tar", "samples": 1}]
    index = {"format": "layerwise-shards/1", "classes": ["a", "b"], "splits": {"train": rows}}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(LayerwiseError, match="is not a layerwise shard index"):
        read_index(tmp_path)


def test_the_command_prints_what_it_wrote_and_refuses_a_bad_size(image_folder, tmp_path, capsys):
    assert main(["shard", str(image_folder), str(tmp_path / "s"), "--shard-size", "16K"]) == 0
    assert "train: 48 images in" in capsys.readouterr().out
    assert main(["shard", str(image_folder), str(tmp_path / "s"), "--shard-size", "lots"]) == 2
    assert "--shard-size='lots' is not a positive number of bytes" in capsys.readouterr().err

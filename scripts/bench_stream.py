"""images/s of the streamed (`data.augment: imagenet`) input paths on this CPU: image folder, tar of the folder,
and shards, with 1, 2 and 4 workers.

    python scripts/bench_stream.py --cifar ../shared/data/cifar10-jpeg-train.tar.gz --workers 1 2 4
    python scripts/bench_stream.py --sets large --images 768 --workers 0 1 2     # the folder path alone, as before

Two image sets, each written as an ImageFolder, a .tar of that folder and shards (`layerwise shard`, at least 8):
- `cifar`: the CIFAR-10 JPEGs of --cifar (the first --cifar-images of them, or the built-in sample's), 32 px,
  RandomResizedCrop to 32 and flip;
- `large`: --images JPEGs of ImageNet's typical size (each of the sample's images upscaled to 500x375 with noise
  added, so that the files weigh about what ImageNet's do), RandomResizedCrop to 224 and flip. Upscaled images
  are smoother than photographs, and a JPEG's entropy decoding is faster the less detail it holds, so this
  rate is an upper bound on real ImageNet's.
The paths, each as `layerwise train` reads them: `folder` (`StreamLoader`: one file read and decoded per image in
DataLoader workers), `tar` (the archive read start to end in one process, each image decoded and cropped: the
only way a tar of a folder can be read without extracting it), `shards` (`ShardLoader`: each worker reads its
own shards through the shuffle buffer). One timed epoch after an untimed one, uint8 crops in batches of 64,
one thread per process. Workers are not lowered to the CPUs here (training lowers them), so 4 workers on 2
cores show the cost of oversubscription. With webdataset installed, its tar reader is timed against
`read_shard` on the same shards, without decoding (the choice between them: docs/decisions.md). `--gpu` adds
the shards with data.decode=gpu: JPEGs decoded in batches and cropped on the GPU (recipes/device_check.sh).
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import v2

import layerwise.data.loaders as loaders
import layerwise.data.shard_loader as shard_loader
from layerwise.config import DataConfig
from layerwise.data.images import decode_bytes
from layerwise.data.loaders import Feed, StreamLoader, imagenet_transform
from layerwise.data.shard_loader import ShardLoader, open_train_shards
from layerwise.data.shards import read_index, read_shard, write_shards
from layerwise.data.sources import image_records, open_train, sample_path

CLASSES = 10
SIZES = {"cifar": (32, 32), "large": (224, 256)}  # crop, validation resize


def sample_jpegs(tarball: Path, count: int) -> list[tuple[str, bytes]]:
    """(class, JPEG bytes) of the first `count` images of an ImageFolder tarball, classes interleaved."""
    with tarfile.open(tarball) as tf:
        members = sorted((m for m in tf.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
        spread = members[:: max(1, len(members) // count)][:count]
        return [(Path(m.name).parent.name, tf.extractfile(m).read()) for m in spread]


def write_set(root: Path, images: list[tuple[str, bytes]]) -> None:
    """An ImageFolder of the images and a .tar of it."""
    for i, (label, data) in enumerate(images):
        (root / "folder" / label).mkdir(parents=True, exist_ok=True)
        (root / "folder" / label / f"{i:05d}.jpg").write_bytes(data)
    with tarfile.open(root / "folder.tar", "w") as tar:
        tar.add(root / "folder", arcname="folder")


def enlarged(images: list[tuple[str, bytes]], size: tuple[int, int], quality: int) -> list[tuple[str, bytes]]:
    resize, g, out = v2.Resize(size, antialias=True), torch.Generator().manual_seed(0), []
    for label, data in images:
        small = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        big = resize(small).float() + 20 * torch.randn((3, *size), generator=g)  # photo-like detail
        out.append((label, bytes(encode_jpeg(big.clamp(0, 255).to(torch.uint8), quality=quality).numpy())))
    return out


def epoch_seconds(loader) -> float:
    for _ in loader.batches(seed=0):  # warm-up: page cache, worker start-up paths
        pass
    t0 = time.perf_counter()
    for _ in loader.batches(seed=1):
        pass
    if loader.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def tar_seconds(tar: Path, cfg: DataConfig) -> float:
    """The tar of the folder, read start to end in this process, each image decoded and cropped."""
    transform = imagenet_transform(cfg, train=True)
    image_records(tar)  # warm-up: page cache
    t0 = time.perf_counter()
    for r in image_records(tar):
        transform(decode_bytes(r.data, r.name))
    return time.perf_counter() - t0


def reader_rates(shards: Path) -> dict[str, float]:
    """Samples/s of read_shard and of webdataset's tar reader over every shard, without decoding."""
    index = read_index(shards)
    paths = [str(shards / r["name"]) for r in index["splits"]["train"]]
    n = sum(r["samples"] for r in index["splits"]["train"])
    out = {}
    t0 = time.perf_counter()
    for p in paths:
        for _ in read_shard(Path(p), CLASSES):
            pass
    out["read_shard"] = n / (time.perf_counter() - t0)
    try:
        import webdataset as wds
    except ImportError:
        return out
    t0 = time.perf_counter()
    count = sum(1 for _ in wds.WebDataset(paths, shardshuffle=False, empty_check=False))
    assert count == n, (count, n)
    out["webdataset"] = n / (time.perf_counter() - t0)
    return out


def measure(root: Path, workers: list[int], batch: int, gpu: bool) -> dict:
    crop, resize = SIZES[root.name]
    cfg = DataConfig(augment="imagenet", image_size=crop, resize_size=resize, val_size=0)
    total = sum(p.stat().st_size for p in (root / "folder").rglob("*.jpg"))
    write_shards(root / "folder", root / "shards", max(16 * 1024, total // 8 + 1))
    files = open_train(root / "folder", decode=False, size=crop).train
    shards = open_train_shards(root / "shards", decode=False, size=crop).train
    n, cpu = len(files), torch.device("cpu")
    rates = {"images": n, "mean_file_kib": round(total / n / 1024, 1), "shard_files": len(shards.shards)}
    rates["tar"] = {1: round(n / tar_seconds(root / "folder.tar", cfg), 1)}
    for path, make in (("folder", lambda c: StreamLoader(files, c, Feed(batch, cpu, True))),
                       ("shards", lambda c: ShardLoader(shards, c, Feed(batch, cpu, True)))):  # fmt: skip
        rates[path] = {w: round(n / epoch_seconds(make(DataConfig(**{**vars(cfg), "workers": w}))), 1)
                       for w in workers}  # fmt: skip
    if gpu:  # data.decode=gpu: readers pass JPEGs on, the GPU decodes and crops them
        feed, decode = Feed(batch, torch.device("cuda"), True), {**vars(cfg), "decode": "gpu"}
        on_gpu = {w: ShardLoader(shards, DataConfig(**{**decode, "workers": w}), feed) for w in workers}
        rates["shards_gpu_decode"] = {w: round(n / epoch_seconds(loader), 1) for w, loader in on_gpu.items()}
    rates["readers_samples_per_s"] = {k: round(v) for k, v in reader_rates(root / "shards").items()}
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=sorted(SIZES), default=sorted(SIZES))
    parser.add_argument("--cifar", type=Path, help="an ImageFolder tarball of CIFAR-10 JPEGs (default: the sample)")
    parser.add_argument("--cifar-images", type=int, default=20000)
    parser.add_argument("--images", type=int, default=768, help="images of the large set")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--gpu", action="store_true", help="also the shards with data.decode=gpu (needs CUDA)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaders.usable_workers = shard_loader.usable_workers = lambda asked: asked  # measure 4 workers on 2 cores too
    result = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            root = Path(tmp) / name
            if name == "cifar":
                write_set(root, sample_jpegs(args.cifar or sample_path(), args.cifar_images))
            else:
                write_set(root, enlarged(sample_jpegs(sample_path(), args.images), (375, 500), args.quality))
            result["sets"][name] = measure(root, args.workers, args.batch_size, args.gpu)
            print(json.dumps({name: result["sets"][name]}), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""images/s of the streaming (ImageNet) input pipeline on this CPU, on JPEGs of ImageNet's size.

    python scripts/bench_stream.py --images 512 --workers 1 2

Makes ImageNet-sized JPEGs from the built-in sample (each CIFAR image upscaled to 500x375, ImageNet's typical
size, with noise so that the files weigh about what ImageNet's do), then times one training epoch of the
`imagenet` loader over them: `StreamLoader` as `layerwise train` builds it (decode with torchvision.io,
RandomResizedCrop to 224, flip, uint8 batches), once per worker count, after an untimed warm-up epoch.
"""

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from layerwise.config import DataConfig
from layerwise.data.loaders import Feed, StreamLoader
from layerwise.data.sources import Files, sample_path


def make_images(root: Path, count: int, size: tuple[int, int], quality: int) -> Files:
    """`count` JPEGs of size (H, W) from the sample's first images, in one class folder per sample class."""
    resize = v2.Resize(size, antialias=True)
    g = torch.Generator().manual_seed(0)
    paths, labels = [], []
    with tarfile.open(sample_path()) as tf:
        members = sorted((m for m in tf.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
        for i, member in enumerate(members[:: max(1, len(members) // count)][:count]):
            small = decode_jpeg(torch.frombuffer(bytearray(tf.extractfile(member).read()), dtype=torch.uint8))
            big = resize(small).float() + 20 * torch.randn((3, *size), generator=g)  # photo-like detail
            path = root / f"{i:05d}.jpg"
            path.write_bytes(bytes(encode_jpeg(big.clamp(0, 255).to(torch.uint8), quality=quality).numpy()))
            paths.append(str(path))
            labels.append(i % 10)
    return Files(paths, labels)


def epoch_seconds(files: Files, workers: int, batch: int) -> float:
    cfg = DataConfig(augment="imagenet", image_size=224, resize_size=256, workers=workers)
    loader = StreamLoader(files, cfg, Feed(batch, torch.device("cpu"), train=True))
    for _ in loader.batches(seed=0):  # warm-up: page cache, worker start-up paths
        pass
    t0 = time.perf_counter()
    for _ in loader.batches(seed=1):
        pass
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_images(Path(tmp), args.images, (375, 500), args.quality)
        mean_kb = sum(Path(p).stat().st_size for p in files.paths) / len(files) / 1024
        result = {
            "images": len(files),
            "size": "500x375",
            "mean_file_kib": round(mean_kb, 1),
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "workers": {},
        }
        for workers in args.workers:
            seconds = epoch_seconds(files, workers, args.batch_size)
            result["workers"][workers] = {"images_per_s": round(len(files) / seconds, 1)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

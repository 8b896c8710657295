"""images/s of `layerwise predict` on a folder of images: batched with decoding threads, against one at a time.

    python scripts/bench_predict.py RUN_DIR --images 2000 [--repeats 2]

Writes `--images` JPEGs from the built-in sample into a temporary folder, then answers the whole folder with
`layerwise.predict.predict` (what the command runs, less the process start-up and the printing): once one image
at a time (batch 1, one decoding thread) and once batched (`--batch-size`, `--workers` threads), alternating,
`--repeats` times each, after an untimed warm-up pass. Prints JSON.
"""

import argparse
import json
import os
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from layerwise.data.sources import sample_path
from layerwise.predict import Answering, predict


def write_images(root: Path, count: int) -> None:
    """`count` of the sample's JPEGs (its 32x32 CIFAR-10 images, cycled), as files under `root`."""
    with tarfile.open(sample_path()) as tf:
        members = sorted((m for m in tf.getmembers() if m.name.endswith(".jpg")), key=lambda m: m.name)
        for i in range(count):
            (root / f"{i:05d}.jpg").write_bytes(tf.extractfile(members[i % len(members)]).read())


def images_per_s(run_dir: str, folder: str, batch: int, workers: int) -> float:
    t0 = time.perf_counter()
    answered = sum(1 for a in predict(run_dir, [folder], Answering(device="cpu", batch_size=batch, workers=workers))
                   if "top" in a)  # fmt: skip
    return answered / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    settings = {"one_at_a_time": (1, 1), "batched": (args.batch_size, args.workers)}
    result = {
        "images": args.images,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "settings": {k: {"batch_size": b, "workers": w} for k, (b, w) in settings.items()},
        "images_per_s": {k: [] for k in settings},
    }
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), args.images)
        images_per_s(args.run_dir, tmp, args.batch_size, args.workers)  # warm-up: page cache, kernels
        for _ in range(args.repeats):
            for name, (batch, workers) in settings.items():
                result["images_per_s"][name].append(round(images_per_s(args.run_dir, tmp, batch, workers), 1))
    one, many = (sum(v) / len(v) for v in result["images_per_s"].values())
    result["speed_up"] = round(many / one, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

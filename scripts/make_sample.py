"""Rebuild the built-in sample from the CIFAR-10 JPEG training archive.

    python scripts/make_sample.py ../shared/data/cifar10-jpeg-train.tar.gz --per-class 500

Takes the first N images of each class (by file name) and writes them, unchanged, as
layerwise/data/sample/cifar10-sample.tar.gz in ImageFolder layout (<class>/<image>.jpg).
"""

import argparse
import io
import tarfile
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("layerwise/data/sample/cifar10-sample.tar.gz"))
    args = parser.parse_args()
    chosen = defaultdict(list)
    with tarfile.open(args.archive) as src:
        members = sorted((m for m in src if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
        for m in members:
            label = Path(m.name).parent.name
            if len(chosen[label]) < args.per_class:
                chosen[label].append((Path(m.name).name, src.extractfile(m).read()))
    with tarfile.open(args.out, "w:gz") as out:
        for label in sorted(chosen):
            for name, data in chosen[label]:
                info = tarfile.TarInfo(f"{label}/{name}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                out.addfile(info, io.BytesIO(data))
    print(f"wrote {sum(map(len, chosen.values()))} images of {len(chosen)} classes to {args.out}")


if __name__ == "__main__":
    main()

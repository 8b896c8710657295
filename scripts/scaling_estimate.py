"""Estimate the wall time of the paper's ImageNet recipes on 1, 8 and 64 GPUs from counted FLOPs.

    python scripts/scaling_estimate.py                      # the assumptions in docs/scaling.md
    python scripts/scaling_estimate.py --tflops 300 --json  # another GPU throughput

FLOPs per image are counted, not assumed: every block and head of each preset runs once on a meta-device image
under torch.utils.flop_counter (2 FLOPs per multiply-add, convolutions and linear layers). A training step costs
the frozen prefix's forward pass plus three times the trained part's (forward, and a backward of about twice the
forward); each epoch also scores the validation images once. Each stage then runs at the slowest of three rates,
which DDP and the DataLoader overlap: the GPUs' arithmetic, the CPU cores decoding JPEGs, and the gradient
all-reduce. Every other figure is an assumption, given on the command line and printed with the result.
"""

import argparse
import dataclasses
import json

import torch

from layerwise.models import build_model
from layerwise.models.partition import flops_per_image
from layerwise.presets import load_preset
from layerwise.stages import plan_stages

TRAIN_IMAGES, VAL_IMAGES = 1_281_167, 50_000
RECIPES = [
    ("imagenet_simcnn_k1", "greedy"),
    ("imagenet_simcnn_k1", "e2e"),
    ("imagenet_simcnn_k2", "greedy"),
    ("imagenet_simcnn_k2", "e2e"),
    ("imagenet_simcnn_k3", "greedy"),
    ("imagenet_simcnn_k3", "e2e"),
    ("imagenet_vgg11_k3", "greedy"),
    ("imagenet_vgg11_e2e", "e2e"),
]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def per_image(preset: str) -> tuple[list[float], list[float], list[int], list[int]]:
    """Forward FLOPs of each block and each head for one image, and their parameter counts."""
    cfg = load_preset(preset)
    blocks, heads = flops_per_image(cfg.model, 1000, cfg.data.image_size)
    with torch.device("meta"):
        net = build_model(cfg.model, 1000)
    return blocks, heads, [count(b) for b in net.blocks], [count(h) for h in net.heads]


@dataclasses.dataclass
class Assumptions:
    tflops: float  # achieved bf16 TFLOP/s per GPU
    core_rate: float  # images/s one CPU core decodes and crops
    cores_per_gpu: int
    busbw_node: float  # GB/s of NCCL all-reduce bus bandwidth within a node
    busbw_net: float  # GB/s between nodes
    gpus_per_node: int
    batch: int  # global batch


def stage_seconds(train_flops: float, eval_flops: float, grad_bytes: int, gpus: int, a: Assumptions) -> dict:
    """One epoch of one stage on `gpus` GPUs: the time each resource needs, and the slowest (the pace)."""
    compute = (TRAIN_IMAGES * train_flops + VAL_IMAGES * eval_flops) / (gpus * a.tflops * 1e12)
    inputs = (TRAIN_IMAGES + VAL_IMAGES) / (gpus * a.cores_per_gpu * a.core_rate)
    busbw = a.busbw_node if gpus <= a.gpus_per_node else a.busbw_net
    steps = TRAIN_IMAGES / a.batch
    comm = 0.0 if gpus == 1 else steps * 2 * (gpus - 1) / gpus * grad_bytes / (busbw * 1e9)
    times = {"gpu": compute, "input": inputs, "all-reduce": comm}
    pace = max(times, key=times.get)
    return {**times, "pace": pace, "seconds": times[pace]}


def estimate(preset: str, mode: str, a: Assumptions, gpus_list: list[int]) -> dict:
    cfg = load_preset(preset)
    blocks, heads, block_params, head_params = per_image(preset)
    rows = []
    for stage in plan_stages(len(blocks), mode):
        trained = sum(blocks[j] for j in stage.trained_blocks) + heads[stage.block]
        prefix = sum(blocks[j] for j in stage.frozen_blocks)
        scored = sum(blocks[: stage.block + 1]) + sum(heads[j] for j in stage.eval_heads)
        n_params = sum(block_params[j] for j in stage.trained_blocks) + head_params[stage.block]
        row = {
            "stage": stage.name,
            "train_gflops_per_image": (prefix + 3 * trained) / 1e9,
            "gradient_mib": 4 * n_params / 2**20,
        }
        for g in gpus_list:
            epoch = stage_seconds(prefix + 3 * trained, scored, 4 * n_params, g, a)
            row[f"{g}_gpus"] = {**{k: (v if isinstance(v, str) else round(v, 1)) for k, v in epoch.items()}}
        rows.append(row)
    epochs = cfg.train.epochs_per_block
    hours = {g: epochs * sum(r[f"{g}_gpus"]["seconds"] for r in rows) / 3600 for g in gpus_list}
    # the cores that would decode as fast as one GPU computes: the fastest stage's images/s over a core's
    gpu_rates = [(TRAIN_IMAGES + VAL_IMAGES) / (r[f"{gpus_list[0]}_gpus"]["gpu"] * gpus_list[0]) for r in rows]
    paced_by = {g: [r[f"{g}_gpus"]["pace"] for r in rows] for g in gpus_list}
    return {
        "preset": preset,
        "mode": mode,
        "epochs_per_stage": epochs,
        "stages": rows,
        "hours": hours,
        "paced_by": paced_by,
        "cores_per_gpu_needed": {
            "every_stage": max(gpu_rates) / a.core_rate,
            "mean_stage": sum(gpu_rates) / len(gpu_rates) / a.core_rate,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tflops", type=float, default=400.0, help="achieved bf16 TFLOP/s per GPU")
    rate = "images/s per CPU core (decode + crop; shards, docs/scaling.md)"
    parser.add_argument("--core-rate", type=float, default=255.0, help=rate)
    parser.add_argument("--cores-per-gpu", type=int, default=12)
    parser.add_argument("--busbw-node", type=float, default=360.0, help="all-reduce GB/s within a node (NVLink)")
    parser.add_argument("--busbw-net", type=float, default=40.0, help="all-reduce GB/s between nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    a = Assumptions(
        args.tflops, args.core_rate, args.cores_per_gpu, args.busbw_node, args.busbw_net, args.gpus_per_node, 256
    )
    results = [estimate(p, m, a, args.gpus) for p, m in RECIPES]
    if args.json:
        print(json.dumps({"assumptions": dataclasses.asdict(a), "recipes": results}, indent=2))
        return
    print(f"assumptions: {dataclasses.asdict(a)}")
    header = f"{'preset':<22} {'mode':<6} {'GFLOP/img':>9} " + " ".join(f"{f'{g} GPU h':>9}" for g in args.gpus)
    paced_by = "  stages paced by gpu / input / all-reduce, on " + ", ".join(map(str, args.gpus)) + " GPUs"
    print(header + paced_by + "  cores per GPU for no stage to wait (mean stage)")
    for r in results:
        total = sum(s["train_gflops_per_image"] for s in r["stages"])
        hours = " ".join(f"{r['hours'][g]:>9.1f}" for g in args.gpus)
        paces = [r["paced_by"][g] for g in args.gpus]
        paced = ", ".join("/".join(str(p.count(k)) for k in ("gpu", "input", "all-reduce")) for p in paces)
        cores = r["cores_per_gpu_needed"]
        needed = f"{cores['every_stage']:.0f} ({cores['mean_stage']:.0f})"
        print(f"{r['preset']:<22} {r['mode']:<6} {total:>9.1f} {hours}  {paced}  {needed}")


if __name__ == "__main__":
    main()

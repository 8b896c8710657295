"""`layerwise bench`: speed and memory of every block's training step, and of the input pipeline.

It builds the network and trains each stage through the objects `train` uses (checked_model, Precision,
StageTraining). For each block j of a preset it times the real training step three ways:
- greedy, uncached: the frozen blocks < j run (without gradients) in every step;
- greedy, prefix cached: the step starts from x_j, as it does when train.cache is on;
- end-to-end: every block and the last head (one row, the same for every j);
- decoupled: every block and every head at once, each block from its own head (one row);
and, with `recompute_activations`, the uncached and end-to-end steps again with train.recompute_activations.
Peak memory comes from torch.cuda on a GPU and from the process's peak resident set on the CPU.
The input benchmark compares the in-memory loader with a per-sample PIL/torchvision DataLoader.
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from layerwise.config import COMPILE_MODES, PRECISIONS, RunConfig
from layerwise.data.sources import sample_path
from layerwise.device import Precision, resolve_device
from layerwise.distributed import SINGLE, Dist, check_batch, compute_for, from_env, process_group
from layerwise.errors import LayerwiseError
from layerwise.evaluate import evaluate
from layerwise.limits import Budget
from layerwise.models.blocks import set_recompute
from layerwise.network import checked_model
from layerwise.presets import load_preset
from layerwise.stages import module_bytes, place_for, plan_stages, resident_modules
from layerwise.train.checkpoint import BackgroundWriter, checkpoint_job, save_checkpoint
from layerwise.train.loop import StageTraining
from layerwise.train.optim import make_optimizer
from layerwise.train.stage import StageModule, frozen_prefix


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict filled on exit with `peak` (bytes in use at the peak) and `step` (the peak above the
    memory in use on entry: activations, gradients, optimizer state and transient buffers)."""
    out: dict[str, int | None] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak"] = torch.cuda.max_memory_allocated(device)
        out["step"] = out["peak"] - base
        return
    _mmap_threshold(128 * 1024, trim=True)
    try:  # Linux: writing 5 resets the peak resident set (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _proc_status("VmRSS")
    try:
        yield out
    finally:
        peak = _proc_status("VmHWM")
        # glibc's largest threshold: steps timed after the measurement reuse freed memory again instead of
        # page-faulting in fresh pages for every tensor, which made the demo's CPU steps 2.3x slower (2026-12-01).
        _mmap_threshold(32 * 1024 * 1024)
    out["peak"] = peak
    out["step"] = None if peak is None or base is None else max(peak - base, 0)


def _mmap_threshold(size: int, trim: bool = False) -> None:
    """Set glibc's mmap threshold (glibc only), to make the process's resident set follow PyTorch's CPU
    allocations while memory is measured.

    glibc raises its mmap threshold as large blocks are freed and then keeps freed memory in the heap,
    so a second measurement would see the first one's leftovers. A fixed 128 KiB threshold sends every
    tensor of that size or more to mmap, which returns it to the system when freed.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, size)  # M_MMAP_THRESHOLD
        if trim:
            libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """How a benchmark trains and times its steps: the run's config and precision, untimed and timed steps, and the
    process group (one process, or DDP under torchrun)."""

    cfg: RunConfig
    precision: Precision
    warmup: int
    steps: int
    where: Dist = SINGLE
    memory: bool = True
    """Measure the step's peak memory (during the untimed steps) as well as its speed."""


def time_steps(net, stage, x, y, offset: int, timing: Timing) -> dict:
    """images/s (over every process) and memory of `steps` real training steps (StageTraining, as `train` runs
    them) after `warmup` untimed ones (which compile when cfg.train.compile asks), with only the stage's modules on
    the device. x and y are this process's share of the batch."""
    device = timing.precision.device
    training = StageTraining(net, stage, timing.cfg, timing.precision, timing.where.replicas)
    resident = resident_modules(net, stage)
    # The peak comes from the warm-up steps and one more (the optimizer's state is created in the first); the
    # timed steps follow outside the measurement, whose allocator settings would slow them on the CPU.
    with peak_memory(device) if timing.memory else nullcontext({"peak": None, "step": None}) as mem:
        for _ in range(timing.warmup + 1):
            training.step(x, y, offset)
        _sync(device)
    t0 = time.perf_counter()
    for _ in range(timing.steps):
        training.step(x, y, offset)
    _sync(device)
    seconds = time.perf_counter() - t0
    del training
    for p in net.parameters():
        p.grad = None
    return {
        "images_per_s": len(y) * timing.where.world_size * timing.steps / seconds,
        "peak_bytes": mem["peak"],
        "step_bytes": mem["step"],
        "weights_bytes": module_bytes(resident),
    }


@dataclass(frozen=True)
class BenchSpec:
    """What a benchmark measures: a preset at a batch size and image size (None: the preset's), on a device,
    in a precision, compiled or not, with activations recomputed or not."""

    preset: str
    batch_size: int | None = None
    device: str = "auto"
    image_size: int | None = None
    precision: str = "auto"
    compile_mode: str = "none"
    recompute_activations: bool = False
    block_chunks: int = 0
    """train.block_chunks for the greedy steps whose block feeds only its head's half pooling (VGG-11)."""


def bench_config(spec: BenchSpec) -> RunConfig:
    """The preset's config with the benchmark's batch, image size, device, precision and compile mode."""
    cfg = load_preset(spec.preset)
    if spec.compile_mode not in COMPILE_MODES:
        raise LayerwiseError(f"--compile must be one of {', '.join(COMPILE_MODES)} (got {spec.compile_mode!r})")
    if spec.precision not in PRECISIONS:
        raise LayerwiseError(f"--precision must be {', '.join(PRECISIONS)} (got {spec.precision!r})")
    if spec.compile_mode != "none" and spec.recompute_activations:
        raise LayerwiseError("--compile and --recompute-activations cannot be combined; choose one")
    train = {
        "batch_size": spec.batch_size or cfg.train.batch_size,
        "device": spec.device,
        "precision": spec.precision,
        "compile": spec.compile_mode,
        "block_chunks": spec.block_chunks,
    }
    data = {"image_size": spec.image_size or cfg.data.image_size}
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, **train), data=dataclasses.replace(cfg.data, **data)
    )


@dataclass
class Bench:
    """A benchmark set up as `train` sets up a run: the config, this process's device and precision (the
    same compute_for), the classes (model.num_classes: a benchmark has no data) and the network."""

    cfg: RunConfig
    compute: Precision
    classes: int
    net: torch.nn.Module


def bench_setup(spec: BenchSpec, where: Dist = SINGLE) -> Bench:
    """The network `train` would build (checked_model), with greedy block 0's modules on the device; the same
    seed in every process."""
    cfg = bench_config(spec)
    check_batch(cfg.train.batch_size, where.world_size)
    compute = compute_for(cfg.train, where)
    torch.manual_seed(0)
    try:
        net = checked_model(cfg, cfg.model.num_classes, compute, mode="greedy", processes=where.world_size)
    except LayerwiseError as e:
        if not str(e).startswith("the model cannot be built or run"):
            raise
        raise LayerwiseError(
            f"{spec.preset} cannot run at {cfg.data.image_size} px; use a larger --image-size"
        ) from None
    return Bench(cfg, compute, cfg.model.num_classes, net)


def bench_model(spec: BenchSpec, steps: int = 10, warmup: int = 2, blocks: list[int] | None = None) -> dict:
    """images/s and memory of every greedy block's training step (uncached, on the cached prefix, recomputed
    when asked) and of the end-to-end step, with one checkpoint's and one evaluation's cost."""
    if spec.compile_mode != "none":  # compiling, and CUDA graphs' recording, must not fall in the timed steps
        warmup = max(warmup, 3)
    setup = bench_setup(spec)
    cfg, compute, classes, net = setup.cfg, setup.compute, setup.classes, setup.net
    preset, recompute_activations, compile_mode = spec.preset, spec.recompute_activations, spec.compile_mode
    dev = compute.device
    batch, size = cfg.train.batch_size, cfg.data.image_size  # each measurement places what its stage runs
    x = torch.randn(batch, cfg.model.in_channels, size, size, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    timing = Timing(cfg, compute, warmup, steps)
    rows = []
    greedy = plan_stages(net.J, "greedy")
    if blocks is not None and not all(0 <= j < net.J for j in blocks):
        raise LayerwiseError(f"--blocks must be between 0 and {net.J - 1} for {preset}")
    for stage in greedy if blocks is None else [greedy[j] for j in blocks]:
        row = {"block": stage.block}
        row["uncached"] = time_steps(net, stage, x, y, 0, timing)
        if recompute_activations:
            row["activations_recomputed"] = recomputed(net, stage, x, y, timing)
        if stage.cacheable:  # block 0 has no frozen prefix to cache
            with compute.autocast():  # after the uncached steps' peaks
                x_j = frozen_prefix(net.eval(), stage, x)
            row["cached"] = time_steps(net, stage, x_j, y, stage.first, timing)
            row["cache_speedup"] = row["cached"]["images_per_s"] / row["uncached"]["images_per_s"]
            row["cached_bytes_per_image"] = x_j[0].numel() * x_j.element_size()
            del x_j
        rows.append(row)
    last = greedy[rows[-1]["block"]] if rows else greedy[0]
    checkpoint = time_checkpoint(net, last, cfg, dev)
    evaluation = time_evaluation(net, last, x, y, compute, steps)
    (e2e_stage,) = plan_stages(net.J, "e2e")
    e2e = time_steps(net, e2e_stage, x, y, 0, timing)
    if recompute_activations:
        e2e["activations_recomputed"] = recomputed(net, e2e_stage, x, y, timing)
    decoupled = None
    if blocks is None:  # every block at once, each from its own head (not when measuring chosen blocks)
        (decoupled_stage,) = plan_stages(net.J, "decoupled")
        decoupled = time_steps(net, decoupled_stage, x, y, 0, timing)
        if recompute_activations:
            decoupled["activations_recomputed"] = recomputed(net, decoupled_stage, x, y, timing)
    return {
        "preset": preset,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "batch_size": batch,
        "image_size": size,
        "steps": steps,
        "precision": str(compute),
        "recompute_activations": recompute_activations,
        "block_chunks": spec.block_chunks,
        "compile": compile_mode,
        "blocks": rows,
        "e2e": e2e,
        "decoupled": decoupled,
        "checkpoint": checkpoint,
        "evaluation": evaluation,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }


class _SameBatch:
    """A loader that yields one batch `times` times, to time evaluation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, times: int):
        self.x, self.y, self.times, self.device = x, y, times, x.device

    def batches(self):
        return ((self.x, self.y) for _ in range(self.times))


def time_evaluation(net, stage, x, y, precision: Precision, steps: int) -> dict:
    """images/s of the per-epoch evaluation of `stage` (every head it scores and their ensemble): running every
    head, against reusing the frozen heads' scores as training does after the stage's first evaluation."""
    place_for(net, stage, precision.device)
    loader, heads, autocast = _SameBatch(x, y, steps), list(stage.eval_heads), precision.autocast
    memo: dict = {}
    evaluate(net, loader, heads, autocast=autocast, memo=memo)  # warm-up; fills the memo
    t0 = time.perf_counter()
    evaluate(net, loader, heads, autocast=autocast)
    every_head = time.perf_counter() - t0
    images = len(y) * steps
    result = {"block": stage.block, "every_head_images_per_s": images / every_head, "reused_images_per_s": None}
    if stage.frozen_heads:  # block 0 has no frozen head
        t0 = time.perf_counter()
        evaluate(net, loader, heads, autocast=autocast, memo=memo)
        result["reused_images_per_s"] = images / (time.perf_counter() - t0)
    return result


def time_checkpoint(net, stage, cfg: RunConfig, device, repeats: int = 3) -> dict:
    """How long an epoch waits for its checkpoint (weights and momentum) in `stage`: written in line, against
    snapshotted and handed to the background writer, as training does (the median of `repeats`)."""
    place_for(net, stage, device)
    optimizer = make_optimizer(StageModule(net, stage).parameters(), cfg.train)
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    meta = {"stage": stage.index, "epoch": 1}
    inline, background = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        for _ in range(repeats):
            t0 = time.perf_counter()
            save_checkpoint(path, meta, {"model": net.state_dict(), "optimizer": optimizer.state_dict()})
            inline.append(time.perf_counter() - t0)
        with BackgroundWriter() as writer:
            for _ in range(repeats):
                writer.wait()  # a training epoch outlasts the write before it
                t0 = time.perf_counter()
                writer.submit(checkpoint_job(path, meta, net, {"optimizer": optimizer.state_dict()}))
                background.append(time.perf_counter() - t0)
        size = path.stat().st_size
    return {
        "block": stage.block,
        "bytes": size,
        "inline_s": sorted(inline)[repeats // 2],
        "background_s": sorted(background)[repeats // 2],
    }


def recomputed(net, stage, x, y, timing: Timing) -> dict:
    """time_steps of the uncached step with train.recompute_activations on."""
    set_recompute(net, True)
    try:
        return time_steps(net, stage, x, y, 0, timing)
    finally:
        set_recompute(net, False)


def fits(net, stage, timing: Timing, batch: int, classes: int) -> bool:
    """Whether three training steps of `stage` at this batch size run without running out of GPU memory."""
    cfg, device = timing.cfg, timing.precision.device
    size = cfg.data.image_size
    try:
        x = torch.randn(batch, cfg.model.in_channels, size, size, device=device)
        y = torch.randint(0, classes, (batch,), device=device)
        time_steps(net, stage, x, y, 0, timing)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        for p in net.parameters():
            p.grad = None
        torch.cuda.empty_cache()


def max_batch(spec: BenchSpec, limit: int = 8192) -> dict:
    """Largest batch (a power of two, then refined by bisection) whose training step fits on the GPU:
    greedy block by block (the run's limit is the smallest of them) and end to end."""
    if resolve_device(spec.device).type != "cuda":
        raise LayerwiseError("--max-batch measures GPU memory; run it with a CUDA device")
    setup = bench_setup(dataclasses.replace(spec, batch_size=None, compile_mode="none"))
    cfg, compute, classes, net = setup.cfg, setup.compute, setup.classes, setup.net  # time_steps places each stage
    preset, recompute_activations, dev = spec.preset, spec.recompute_activations, compute.device
    set_recompute(net, recompute_activations)
    timing = Timing(cfg, compute, warmup=1, steps=1)

    def largest(stage) -> int:
        lo, hi = 0, 1
        while hi <= limit and fits(net, stage, timing, hi, classes):
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)  # never try beyond the limit
        while hi - lo > max(1, lo // 16):  # bisect to within about 6%
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(net, stage, timing, mid, classes) else (lo, mid)
        return lo

    greedy = {stage.block: largest(stage) for stage in plan_stages(net.J, "greedy")}
    return {
        "preset": preset,
        "device_name": torch.cuda.get_device_name(dev),
        "image_size": cfg.data.image_size,
        "recompute_activations": recompute_activations,
        "precision": str(compute),
        "greedy_per_block": greedy,
        "greedy": min(greedy.values()),
        "e2e": largest(plan_stages(net.J, "e2e")[0]),
    }


def bench_processes(spec: BenchSpec, steps: int = 10, warmup: int = 2) -> dict:
    """images/s of every greedy block's (uncached) training step and of the end-to-end step, over every process
    of the run: under torchrun through DDP, each process stepping on its share of the global batch. Also what one
    all-reduce of the stage's gradients costs (the whole of DDP's communication per step, not overlapped here)."""
    where, preset = from_env(), spec.preset
    spec = dataclasses.replace(spec, image_size=None, compile_mode="none", recompute_activations=False)
    train_cfg = bench_config(spec).train
    check_batch(train_cfg.batch_size, where.world_size)  # before joining the other processes
    dev = compute_for(train_cfg, where).device
    with process_group(where, dev):
        setup = bench_setup(spec, where)  # the same network and batch in every process
        cfg, compute, classes, net = setup.cfg, setup.compute, setup.classes, setup.net
        batch, size = cfg.train.batch_size, cfg.data.image_size
        x = torch.randn(batch, cfg.model.in_channels, size, size, device=dev).tensor_split(where.world_size)
        y = torch.randint(0, classes, (batch,), device=dev).tensor_split(where.world_size)
        timing = Timing(cfg, compute, warmup, steps, where, memory=False)
        rows = []
        for stage in [*plan_stages(net.J, "greedy"), *plan_stages(net.J, "e2e")]:
            row = {"stage": stage.name, **time_steps(net, stage, x[where.rank], y[where.rank], 0, timing)}
            rows.append({**row, **time_allreduce(StageModule(net, stage), timing)})
    return {
        "preset": preset,
        "device": str(dev),
        "processes": where.world_size,
        "threads_per_process": torch.get_num_threads(),
        "batch_size": batch,
        "precision": str(compute),
        "stages": rows,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }


def time_allreduce(module: torch.nn.Module, timing: Timing) -> dict:
    """Milliseconds of one all-reduce of as many fp32 values as the module has parameters (0 in one process)."""
    grads = torch.zeros(sum(p.numel() for p in module.parameters()), device=timing.precision.device)
    seconds = 0.0
    if timing.where.active:
        for _ in range(timing.warmup):
            torch.distributed.all_reduce(grads)
        _sync(grads.device)
        t0 = time.perf_counter()
        for _ in range(timing.steps):
            torch.distributed.all_reduce(grads)
        _sync(grads.device)
        seconds = (time.perf_counter() - t0) / timing.steps
    return {"gradient_bytes": grads.nbytes, "allreduce_ms": 1e3 * seconds}


def format_processes(result: dict) -> str:
    lines = [
        f"{result['preset']} on {result['processes']} process(es) x {result['threads_per_process']} thread(s), "
        f"{result['device']}, global batch {result['batch_size']}, {result['precision']}",
        f"{'stage':<9} {'img/s':>9} {'gradients MiB':>14} {'all-reduce ms':>14}",
    ]
    for r in result["stages"]:
        lines.append(
            f"{r['stage']:<9} {r['images_per_s']:>9.1f} {mib(r['gradient_bytes']):>14} {r['allreduce_ms']:>14.2f}"
        )
    return "\n".join(lines)


def bench_input(
    preset: str, data: str | None = None, batch_size: int | None = None, workers: int | None = None
) -> dict:
    """One epoch of input handling: the in-memory loader against a per-sample PIL DataLoader (CPU)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    from layerwise.data import build_data

    cfg = load_preset(preset)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_size=0.1))
    batch = batch_size or cfg.train.batch_size
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    bundle = build_data(cfg.data, data, batch, cpu)
    decode_s = time.perf_counter() - t0
    n = bundle.train.num_examples
    t0 = time.perf_counter()
    for _ in bundle.train.batches(seed=0):
        pass
    memory_epoch_s = time.perf_counter() - t0

    workers = os.cpu_count() if workers is None else workers
    transform = v2.Compose(
        [
            v2.RandomCrop(cfg.data.image_size, padding=cfg.data.crop_padding),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(cfg.data.mean, cfg.data.std),
        ]
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = _extract_images(data, Path(tmp))
        dataset = datasets.ImageFolder(root, transform=transform)
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers)
        t0 = time.perf_counter()
        seen = 0
        for xb, _ in loader:
            seen += len(xb)
        pil_epoch_s = (time.perf_counter() - t0) * n / seen  # scaled to the same number of images
    return {
        "images": n,
        "batch_size": batch,
        "decode_once_s": decode_s,
        "memory_loader_epoch_s": memory_epoch_s,
        "pil_dataloader_epoch_s": pil_epoch_s,
        "pil_workers": workers,
    }


def _extract_images(data: str | None, tmp: Path) -> Path:
    """An ImageFolder root for the PIL baseline: the folder itself, or the sample (or a tar archive) extracted.
    With train/ and val/ splits, the train/ split."""
    path = sample_path() if data is None else Path(data)
    if not path.is_dir():
        try:
            with tarfile.open(path) as tf:
                budget = Budget(path)
                for member in tf:  # each member sized before it is written, as when reading archives
                    if member.isfile():
                        budget.take(f"{path}:{member.name}", member.size)
                    tf.extract(member, tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise LayerwiseError(f"cannot extract {path} for the input benchmark ({e}); pass --no-input") from None
    root = path if path.is_dir() else tmp
    roots = {p.parent.parent for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    roots = {r for r in roots if r.name == "train"} or roots
    if len(roots) != 1:
        raise LayerwiseError(
            f"the input benchmark needs image files in one <root>/<class>/ tree, which {path} is not; "
            "pass such a folder or archive with --data, or --no-input"
        )
    return roots.pop()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def memory_lines(first: dict, e2e: dict, lean: bool, on_gpu: bool) -> list[str]:
    """A small table: the first benchmarked block's greedy step against the end-to-end step, by step memory alone,
    with the weights each keeps on the device, and (on a GPU) by the measured peaks."""
    pairs = [("plain", first["uncached"], e2e)]
    if lean:
        recomputed = first["activations_recomputed"]
        pairs += [("both recomputed", recomputed, e2e["activations_recomputed"])]
        pairs += [("recomputed / plain e2e", recomputed, e2e)]
    sizes = {
        "step": lambda r: r["step_bytes"],
        "step + the stage's weights": lambda r: r["step_bytes"] and r["step_bytes"] + r["weights_bytes"],
    }
    if on_gpu:  # on the CPU the process's peak holds far more than the step
        sizes["peak (weights, batch, all)"] = lambda r: r["peak_bytes"]
    lines = [f"block {first['block']} greedy / end-to-end, MiB:".ljust(30) + "".join(f"{n:>28}" for n, _, _ in pairs)]
    for label, size in sizes.items():
        cells = [
            f"{mib(size(a))} / {mib(size(b))} = {size(a) / size(b):.2f}x" if size(a) and size(b) else "n/a"
            for _, a, b in pairs
        ]
        lines.append(f"  {label:<28}" + "".join(f"{c:>28}" for c in cells))
    return lines


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def format_report(model: dict, inputs: dict | None) -> str:
    lean = model.get("recompute_activations")
    lines = [
        f"{model['preset']} on {model['device']} ({model['device_name']}, {model['threads']} threads), "
        f"batch {model['batch_size']}, {model['image_size']} px, {model['precision']}, {model['steps']} timed steps"
        + (f", compiled ({model['compile']})" if model.get("compile", "none") != "none" else ""),
        f"{'':<6} {'img/s':>30} {'step MiB':>22}" + (f" {'activations recomputed':>28}" if lean else ""),
        f"{'block':<6} {'uncached':>10} {'cached':>10} {'speed-up':>8} {'uncached':>10} {'cached':>10}"
        + (f" {'img/s':>12} {'step MiB':>15}" if lean else ""),
    ]
    e = model["e2e"]
    rows = [(r["block"], r["uncached"], r.get("cached"), r.get("activations_recomputed")) for r in model["blocks"]]
    d = model.get("decoupled")
    rows += [("e2e", e, None, e.get("activations_recomputed"))]
    rows += [("dec", d, None, d.get("activations_recomputed"))] if d else []
    for name, plain, cached, recomputed in rows:
        line = f"{name:<6} {plain['images_per_s']:>10.1f} "
        if cached:
            speedup = cached["images_per_s"] / plain["images_per_s"]
            line += f"{cached['images_per_s']:>10.1f} {speedup:>7.2f}x {mib(plain['step_bytes']):>10} "
            line += f"{mib(cached['step_bytes']):>10}"
        else:
            line += f"{'-':>10} {'-':>8} {mib(plain['step_bytes']):>10} {'-':>10}"
        if recomputed:
            line += f" {recomputed['images_per_s']:>12.1f} {mib(recomputed['step_bytes']):>15}"
        lines.append(line)
    if model["blocks"]:
        lines += memory_lines(model["blocks"][0], e, lean, model["device"].startswith("cuda"))
    v = model["evaluation"]
    line = f"evaluation of block {v['block']}'s heads and ensemble: {v['every_head_images_per_s']:.1f} img/s"
    if v["reused_images_per_s"]:
        line += f" running every head, {v['reused_images_per_s']:.1f} img/s reusing the frozen heads' scores"
    lines.append(line)
    c = model["checkpoint"]
    lines.append(
        f"checkpoint per epoch (block {c['block']}, {mib(c['bytes'])} MiB): training waits "
        f"{1e3 * c['inline_s']:.1f} ms for it written in line, {1e3 * c['background_s']:.1f} ms in the background"
    )
    if inputs:
        train_s = inputs["images"] / model["blocks"][0]["uncached"]["images_per_s"]
        mem, pil = inputs["memory_loader_epoch_s"], inputs["pil_dataloader_epoch_s"]
        lines += [
            f"input, one epoch of {inputs['images']} images (block-0 training step: {train_s:.2f} s per epoch):",
            f"  in-memory loader: {mem:.3f} s = {100 * mem / (mem + train_s):.1f}% of the epoch "
            f"(plus {inputs['decode_once_s']:.2f} s to decode once)",
            f"  per-sample PIL DataLoader ({inputs['pil_workers']} workers): {pil:.3f} s = "
            f"{100 * pil / (pil + train_s):.1f}% of the epoch; in-memory is {pil / mem:.1f}x faster",
        ]
    return "\n".join(lines)

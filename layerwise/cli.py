"""`layerwise` command line: a thin table from commands to library functions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from layerwise.config import MODES, RunConfig, parse_assignment
from layerwise.distributed import QuietError, from_env, stop_quietly
from layerwise.errors import LayerwiseError, one_line
from layerwise.trust import CONFIG_FILE_FIX, check_trusted, code_named, trusting

log = logging.getLogger("layerwise")


def cmd_train(args: argparse.Namespace) -> int:
    from layerwise.presets import resolve
    from layerwise.rundir import RunDir
    from layerwise.train import summary_table, train

    overrides = [parse_assignment(a) for a in args.set]
    flags = {
        "train": {
            "epochs_per_block": args.epochs_per_block,
            "batch_size": args.batch_size,
            "device": args.device,
            "seed": args.seed,
            "mode": args.mode,
            "placement": args.placement,
            "lr": args.lr,
        },
        "data": {
            "val_size": args.val_size,
            "workers": args.workers,
            "val_path": str(Path(args.val_data).resolve()) if args.val_data else None,
        },
    }
    given = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in flags.items()}
    overrides.append({s: kv for s, kv in given.items() if kv})
    if args.resume and args.out is None:
        raise LayerwiseError("--resume needs --out RUN_DIR, the run to continue")
    if args.resume and args.preset is None and args.config is None:  # the run's own config, plus overrides
        cfg, _ = resolve(None, None, overrides, RunDir(args.out).saved_config())
        named_by, fix = f"run directory {args.out}", ""  # it is the run's code to import, whoever names it
    else:
        cfg, named_by = resolve(args.preset or (None if args.config else "demo"), args.config, overrides, None)
        fix = CONFIG_FILE_FIX
    if args.out is None and from_env().active:  # each process would take its own time in the default name
        raise LayerwiseError("under torchrun give --out RUN_DIR: every process must write to the same run directory")
    out = (
        Path(args.out) if args.out else Path("runs") / f"{cfg.preset}-{cfg.train.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if args.dry_run:  # imports nothing, so it may show what an untrusted file names
        print(dry_run(cfg, named_by, out, args), end="")
        return 0
    if named_by is not None:
        check_trusted(cfg.model, named_by, fix)
    if args.download:
        if from_env().active:
            raise LayerwiseError("--download once without torchrun first: every process would write the same files")
        download_cifar10(args.data)
    heads = f"{cfg.model.head} heads" if cfg.model.head != "paper" else f"k={cfg.model.k}"
    log.info("run %s: preset %s, mode %s, arch %s, %s", out, cfg.preset, cfg.train.mode, cfg.model.arch, heads)
    where = from_env()
    resume = f"{'torchrun ... -m layerwise' if where.active else 'layerwise'} train --out {out} --resume"
    signal.signal(signal.SIGTERM, _terminated)  # torchrun stops every process this way when one fails
    try:
        summary = train(cfg, out, data=args.data, resume=args.resume)
    except Terminated:
        if where.active and stop_quietly(where):  # torchrun stops the others when one fails; that one has said why
            return 143
        sys.stderr.write(f"error: stopped by SIGTERM; the checkpoints in {out} are intact; go on with {resume}\n")
        return 143
    except KeyboardInterrupt:
        if where.is_main:
            print(f"interrupted; continue with: {resume}", file=sys.stderr)
        return 130
    finally:  # a SIGTERM while the process exits just ends it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if where.is_main:
        from layerwise.report import report_finished_run

        report_finished_run(out)
        print(summary_table(summary))
        print(f"run saved in {out}")
    return 0


def dry_run(cfg: RunConfig, named_by: str | None, out: Path, args: argparse.Namespace) -> str:
    """What `train` would do, without doing any of it: the resolved config, the code it would import and call
    (and whether that needs --trust-code), and where it would read and write. Imports and writes nothing."""
    code = code_named(cfg.model)
    if code is None:
        code = f"none ({cfg.model.arch} is a library architecture: nothing is imported)"
    elif named_by is not None:
        code += f"; {named_by} names it, so training needs --trust-code"
    action = "resume" if args.resume else "create"
    return (
        f"{cfg.to_yaml()}# code: {code}\n# data: {args.data or 'the built-in sample'}\n# run directory: {out} "
        f"({action})\n"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that training stops the same way: the checkpoint being written is finished."""


def _terminated(signum, frame) -> None:
    raise Terminated


def download_cifar10(root: str | None) -> None:
    """Fetch the CIFAR-10 python archive into root, only because the user asked with --download."""
    if root is None:
        raise LayerwiseError("--download needs --data FOLDER to download CIFAR-10 into")
    from torchvision.datasets import CIFAR10

    try:
        CIFAR10(root=root, train=True, download=True)
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise LayerwiseError(f"could not download CIFAR-10 into {root} ({one_line(e)}); fetch it by hand") from None


def cmd_eval(args: argparse.Namespace) -> int:
    from layerwise.delivered import evaluate_run

    if args.batch_size < 1:
        raise LayerwiseError(f"--batch-size must be >= 1 (got {args.batch_size})")

    if args.early_exit:
        from layerwise.early_exit import early_exit_run

        if args.flip:
            raise LayerwiseError("--flip and --early-exit cannot be combined yet: early exit scores one view")
        result = early_exit_run(args.run_dir, args.data, args.device, args.precision, args.batch_size)
        return print_early_exit(result, args.json)
    result = evaluate_run(args.run_dir, args.data, args.device, args.batch_size, args.precision, args.flip)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    flip = ", each head's scores averaged with the mirrored image's" if result["flip"] else ""
    print(f"{result['n']} images from {args.data}, checkpoint {result['checkpoint']}{flip}")
    print(f"{'block':<6} {'top-1':>7} {'top-5':>7} {'ens top-1':>9} {'ens top-5':>9}")
    for j, b in result["blocks"].items():
        print(f"{j:<6} {b['top1']:>7.2f} {b['top5']:>7.2f} {b['ensemble_top1']:>9.2f} {b['ensemble_top5']:>9.2f}")
    if result.get("not_classifying"):
        heads = ", ".join(map(str, result["not_classifying"]))
        print(f"not scored: the heads of blocks {heads} give no class scores (their local loss does not classify)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from layerwise.report import comparison_text, load_run, write_report

    if args.table:
        print(comparison_text([load_run(p) for p in args.run_dirs]))
        return 0
    out = args.output or (Path(args.run_dirs[0]) / "report.html" if len(args.run_dirs) == 1 else "report.html")
    print(f"report written to {write_report(args.run_dirs, out)}")
    return 0


def print_early_exit(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    t, at, last = result["calibration"]["threshold"], result["at_threshold"], result["last_head"]
    where = f"calibrated on {result['calibrated_on']}"
    if t is None:
        print(f"early exit on {result['data']}: no threshold within {result['tolerance_points']:g} point of the last")
        print(f"  head costs less than the last head alone ({where}): answer with the last head")
    else:
        print(f"early exit on {result['data']}: threshold {t:.3f}, {where}")
        print(f"  at the threshold: top-1 {at['top1']:.2f} %, {at['macs'] / 1e6:.1f} M multiply-adds per image")
        print(f"  answers per head {dict(zip(result['heads'], at['exits_per_head'], strict=True))}")
    print(f"  last head alone:  top-1 {last['top1']:.2f} %, {last['macs'] / 1e6:.1f} M multiply-adds per image")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from layerwise.export import export_run

    print(f"exported to {export_run(args.run_dir, args.format, args.output, args.head, args.ensemble, args.flip)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from layerwise.predict import Answering, predict

    failed = 0
    how = Answering(args.top, args.early_exit, args.flip, args.device, args.batch_size, args.workers)
    for entry in predict(args.run_dir, args.images, how):
        if "error" in entry:
            failed += 1
            print(f"error: {entry['error']}", file=sys.stderr, flush=True)
            if not args.json:
                continue
        if args.json:
            print(json.dumps(entry), flush=True)  # one JSON object per line, errors included
            continue
        guesses = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in entry["top"])
        print(f"{entry['image']}: {guesses}" + (f" (head {entry['head']})" if args.early_exit else ""), flush=True)
    return 2 if failed else 0


def cmd_presets(args: argparse.Namespace) -> int:
    from layerwise.models import architectures, build_model
    from layerwise.presets import list_presets, load_preset

    rows = []
    for name in list_presets():
        cfg = load_preset(name)
        try:
            with torch.device("meta"):  # sizes ImageNet models without allocating them
                net = build_model(cfg.model, cfg.model.num_classes, cfg.data.image_size)
        except LayerwiseError as e:  # an optional extra not installed (timm): listed, not counted
            net, note = None, f" ({one_line(e)})"
        else:
            note = ""
        rows.append(
            {
                "name": name,
                "arch": cfg.model.arch,
                "J": net.J if net else None,
                "k": cfg.model.k if cfg.model.head == "paper" else None,
                "mode": cfg.train.mode,
                "params_final_m": round(net.final_parameters() / 1e6, 2) if net else None,
                "params_heads_m": round(net.head_parameters() / 1e6, 2) if net else None,
                "paper": cfg.paper,
                "description": cfg.description + note,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    wide = max(len(r["name"]) for r in rows)
    print(f"{'preset':<{wide}} {'arch':<12} {'J':>2} {'k':>2} {'mode':<9} {'final (M)':>9} {'heads (M)':>9}  paper")
    for r in rows:
        paper = ", ".join(f"{k} {v:g}" for k, v in r["paper"].items())
        sizes = f"{r['params_final_m']:>9.2f} {r['params_heads_m']:>9.2f}" if r["J"] else f"{'-':>9} {'-':>9}"
        print(
            f"{r['name']:<{wide}} {r['arch']:<12} {r['J'] or '-':>2} {r['k'] or '-':>2} {r['mode']:<9} {sizes}  {paper}"
        )
    print("final = every block + the last head (the delivered network); heads = all auxiliary heads.")
    print(f"architectures (model.arch): {', '.join(architectures())}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from layerwise.bench import BenchSpec, bench_input, bench_model, format_report
    from layerwise.presets import load_preset

    spec = BenchSpec(
        args.preset,
        device=args.device,
        image_size=args.image_size,
        precision=args.precision,
        compile_mode=args.compile,
        recompute_activations=args.recompute_activations,
        block_chunks=args.block_chunks,
    )
    if args.max_batch:
        from layerwise.bench import max_batch

        if args.compile != "none":
            raise LayerwiseError("--max-batch measures the uncompiled step; drop --compile")
        if from_env().active:
            raise LayerwiseError("--max-batch measures one GPU; run it without torchrun")

        result = max_batch(spec)
        print(json.dumps(result, indent=2))
        return 0
    steps, warmup = (args.steps or 2, 1) if args.quick else (args.steps or 10, 2)
    batch = args.batch_size or (32 if args.quick else None)
    for name in ("batch_size", "steps", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LayerwiseError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    where = from_env()
    if args.scaling or where.active:
        from layerwise.bench import bench_processes, format_processes

        result = bench_processes(dataclasses.replace(spec, batch_size=batch), steps, warmup)
        if where.is_main:
            print(json.dumps(result, indent=2) if args.json else format_processes(result))
        return 0
    try:
        blocks = [int(j) for j in args.blocks.split(",")] if args.blocks else None
    except ValueError:
        raise LayerwiseError(
            f"--blocks takes block numbers separated by commas, like 0,3 (got {args.blocks!r})"
        ) from None
    model = bench_model(dataclasses.replace(spec, batch_size=batch), steps, warmup, blocks)
    inputs = None
    if not args.no_input and load_preset(args.preset).data.augment == "cifar":
        inputs = bench_input(args.preset, args.data, model["batch_size"])
    if args.json:
        print(json.dumps({"model": model, "input": inputs}, indent=2))
    else:
        print(format_report(model, inputs))
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from layerwise.data.shards import write_shards
    from layerwise.limits import amount

    index = write_shards(args.src, args.out, int(amount(args.shard_size, "bytes", "--shard-size")), args.seed)
    for split, rows in index["splits"].items():
        print(f"{split}: {sum(r['samples'] for r in rows)} images in {len(rows)} shards")
    print(f"shards, classes.json and index.json in {args.out}")
    return 0


TRUST_HELP = (
    "import the network code (model.builder) that a run or config file names; only for files from a source you trust"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerwise", description="Greedy layerwise CNN training (Belilovsky et al. 2019)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a preset or config; with no arguments, the demo on the built-in sample")
    t.add_argument("--preset", help="a registered preset (see `layerwise presets`); default: demo")
    t.add_argument("--config", help="a YAML config file; may name a preset to start from")
    t.add_argument(
        "--data", help="CIFAR-10 archive/folder, ImageFolder tree or ImageNet layout; default: built-in sample"
    )
    t.add_argument("--out", help="run directory; default: runs/<preset>-<mode>-<time>")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    t.add_argument("--download", action="store_true", help="download CIFAR-10 into --data first")
    t.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    t.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the code it would import and call; import, train and write nothing",
    )
    t.add_argument("--mode", choices=MODES)
    t.add_argument("--placement", choices=["single", "pipeline"], help="decoupled: one block group per process")
    t.add_argument("--epochs-per-block", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--seed", type=int)
    t.add_argument(
        "--val-size", type=float, help="held-out validation images (a count, or a fraction below 1; 0: none)"
    )
    t.add_argument(
        "--val-data",
        help="score this data after every epoch instead of a held-out split (CIFAR-10 archive: its test_batch)",
    )
    t.add_argument("--workers", type=int, help="DataLoader workers for streamed (ImageNet) data")
    t.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any config value, e.g. train.lr_step=4"
    )
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="per-block and ensemble top-1/top-5 of a run on held-out data")
    e.add_argument("run_dir")
    e.add_argument("--data", required=True, help="data no one trained on (CIFAR-10 archive: its test_batch)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--precision", help="auto, fp32 or bf16 (default: the run's train.precision)")
    e.add_argument("--flip", action="store_true", help="average each head's scores with the mirrored image's")
    e.add_argument(
        "--early-exit",
        action="store_true",
        help="accuracy against compute when each image exits at the first confident head (calibrated on the run's"
        " validation split)",
    )
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="images/s and peak memory per block: greedy (prefix uncached, cached) and e2e")
    b.add_argument("--preset", default="cifar10_simcnn_k3")
    b.add_argument("--batch-size", type=int)
    b.add_argument("--device", default="auto")
    b.add_argument("--steps", type=int, help="timed steps per measurement (default 10, quick 2)")
    b.add_argument("--image-size", type=int, help="input side in pixels (default: the preset's)")
    b.add_argument("--blocks", help="comma-separated blocks to measure (default: all)")
    b.add_argument("--quick", action="store_true", help="batch 32 and 2 timed steps: about a minute on a CPU")
    b.add_argument("--max-batch", action="store_true", help="find the largest batch that fits, greedy and e2e (GPU)")
    b.add_argument(
        "--recompute-activations", action="store_true", help="as train.recompute_activations: less memory, more compute"
    )
    b.add_argument(
        "--block-chunks", type=int, default=0, help="as train.block_chunks: VGG blocks run in chunks of the batch"
    )
    b.add_argument(
        "--precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, or bf16 (also on the CPU)"
    )
    b.add_argument("--compile", default="none", help="as train.compile: none, default, reduce-overhead, ...")
    b.add_argument("--data", help="images for the input benchmark (default: the built-in sample)")
    b.add_argument("--no-input", action="store_true", help="skip the input-pipeline benchmark")
    b.add_argument(
        "--scaling",
        action="store_true",
        help="only the training step's img/s per stage and the all-reduce cost; implied under torchrun (DDP)",
    )
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    r = sub.add_parser("report", help="one HTML page with plots for one run, or several side by side")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    r.add_argument("-o", "--output", help="the HTML file (default: RUN_DIR/report.html, or ./report.html for several)")
    r.add_argument(
        "--table", action="store_true", help="print one line per run (settings that differ, top-1, time), no HTML"
    )
    r.set_defaults(func=cmd_report)

    x = sub.add_parser("export", help="the trained network as a file that runs without layerwise (ONNX, torch.export)")
    x.add_argument("run_dir")
    x.add_argument("--format", required=True, choices=["onnx", "pt2"])
    x.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    x.add_argument("--head", type=int, help="answer with this head (default: the last trained one)")
    x.add_argument("--ensemble", action="store_true", help="answer with the ensemble of the trained heads")
    x.add_argument("--flip", action="store_true", help="average each head's logits over the image and its mirror")
    x.add_argument("-o", "--output", help="the file (default: RUN_DIR/model.onnx or model.pt2)")
    x.set_defaults(func=cmd_export)

    q = sub.add_parser("predict", help="the top classes of image files, with their probabilities")
    q.add_argument("run_dir")
    q.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    q.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (every image below), @LIST (one per line) or - (stdin)")  # fmt: skip
    q.add_argument("--top", type=int, default=5)
    q.add_argument("--batch-size", type=int, default=64, help="images the network scores at once")
    q.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="threads that decode images")
    q.add_argument("--early-exit", action="store_true", help="answer at the first confident head (eval calibrates)")
    q.add_argument("--flip", action="store_true", help="average the logits over the image and its mirror")
    q.add_argument("--device", default="auto")
    q.add_argument("--json", action="store_true", help="JSON lines: one object per image, errors included")
    q.set_defaults(func=cmd_predict)

    s = sub.add_parser("shard", help="write a dataset as tar shards (WebDataset's format) with an index")
    s.add_argument("src", help="an image folder (or its archive), the ImageNet layout or a CIFAR-10 python archive")
    s.add_argument("out", help="the folder for the shards, classes.json and index.json")
    s.add_argument("--shard-size", default="512M", help="the most bytes per shard (512M)")
    s.add_argument("--seed", type=int, default=0, help="the seed of each split's sample order (0)")
    s.set_defaults(func=cmd_shard)

    p = sub.add_parser("presets", help="list presets with J, k and parameter counts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        where = from_env()
        quiet = args.quiet or not where.is_main  # under torchrun, rank 0 alone logs
        logging.basicConfig(
            level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr, force=True
        )
        with trusting(getattr(args, "trust_code", False)):
            return args.func(args)
    except QuietError:  # another process of the run has reported it
        return 2
    except LayerwiseError as e:
        # One write: stderr is unbuffered, so print's text and newline would be two, and under torchrun another
        # process's line could land between them
        sys.stderr.write(f"error: {one_line(e)}\n")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1


if __name__ == "__main__":
    sys.exit(main())

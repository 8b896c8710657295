"""`layerwise export` and `layerwise predict`: a trained run as a file that runs without layerwise, and its
answers for image files.

The exported model takes uint8 images (N, 3, H, W), H = W = the run's image size, and includes the
normalisation; it returns class scores: one head's logits, or the running ensemble 2^-J sum_j 2^j z_j.
`pt2` is a torch.export program (load it with `torch.export.load(path).module()`); `onnx` needs the
optional `[export]` dependencies (onnx, onnxscript; onnxruntime to run it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from layerwise.config import RunConfig, config_from_dict
from layerwise.data.images import read_image
from layerwise.data.loaders import Normalize, imagenet_transform
from layerwise.device import precision_for, resolve_device
from layerwise.errors import LayerwiseError
from layerwise.evaluate import add_to_ensemble
from layerwise.models.staged import StagedNet
from layerwise.train.checkpoint import RunDir

FORMATS = ("onnx", "pt2")


class Deployable(nn.Module):
    """uint8 images (N, 3, H, W) -> (N, classes) scores of `heads[-1]`, or with `ensemble` (logits or softmax) the
    running ensemble over `heads`. Holds only the blocks and heads it needs."""

    def __init__(self, net: StagedNet, heads: list[int], cfg: RunConfig, ensemble: str | None = None):
        super().__init__()
        self.last = max(heads)
        self.blocks = nn.ModuleList(net.blocks[: self.last + 1])
        self.heads = nn.ModuleDict({str(j): net.heads[j] for j in (heads if ensemble else [self.last])})
        self.ensemble = ensemble
        normalize = Normalize(cfg.data.mean, cfg.data.std, torch.device("cpu"))  # training's, as buffers
        self.register_buffer("scale", normalize.scale)
        self.register_buffer("shift", normalize.shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.float(), self.scale)
        total = None
        for j, block in enumerate(self.blocks):
            x = block(x)
            if str(j) in self.heads:
                z = self.heads[str(j)](x)
                total = add_to_ensemble(total, z, self.ensemble) if self.ensemble else z
        return total


def deployable(run_dir: str | Path, head: int | None = None, ensemble: bool = False) -> tuple[Deployable, Any]:
    """The run's delivered network as a Deployable on the CPU, in eval mode, and what load_delivered found."""
    from layerwise.train.run import load_delivered

    got = load_delivered(run_dir, precision_for(torch.device("cpu"), "fp32"))
    if head is not None and ensemble:
        raise LayerwiseError("--head and --ensemble exclude each other; choose one")
    if head is not None and head not in got.heads:
        raise LayerwiseError(f"--head {head} is not one of the run's trained heads {got.heads}")
    heads = got.heads if head is None else [h for h in got.heads if h <= head]
    model = Deployable(got.net, heads, got.cfg, got.cfg.train.ensemble if ensemble else None)
    return model.eval().requires_grad_(False), got


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, head: int | None = None,
               ensemble: bool = False) -> Path:  # fmt: skip
    """Write the run's network in `fmt` to `out` (default RUN/model.<fmt>); nothing is left behind on an error."""
    if fmt not in FORMATS:
        raise LayerwiseError(f"--format must be {' or '.join(FORMATS)} (got {fmt!r})")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise LayerwiseError(
                "--format onnx needs the onnx and onnxscript packages: pip install 'layerwise[export]'"
            ) from None
    model, got = deployable(run_dir, head, ensemble)
    size = got.cfg.data.image_size
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    batch = {"images": {0: torch.export.Dim("batch", min=1, max=4096)}}
    out = Path(out) if out else got.run.path / f"model.{fmt}"
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent)) / out.name  # beside out, then renamed into place
    except OSError as e:
        raise LayerwiseError(f"cannot write into {out.parent} ({e.strerror}); choose another -o") from None
    try:
        with torch.no_grad():
            if fmt == "pt2":
                torch.export.save(torch.export.export(model, (example,), dynamic_shapes=batch), tmp)
            else:
                torch.onnx.export(model, (example,), tmp, input_names=["images"], output_names=["scores"],
                                  dynamic_shapes=batch, dynamo=True, external_data=False)  # fmt: skip
        os.replace(tmp, out)
    except LayerwiseError:
        raise
    except Exception as e:  # noqa: BLE001 - exporters fail in many ways
        raise LayerwiseError(f"could not export {got.run.path} as {fmt} ({str(e).strip().splitlines()[0]})") from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp.parent.rmdir()
    return out


def load_image(path: str | Path, cfg: RunConfig) -> torch.Tensor:
    """(3, S, S) uint8, as evaluation sees images: resized (shorter side) and centre-cropped to the run's size."""
    image = read_image(path)  # sized from its header first; the first frame of an animated image
    size = cfg.data.image_size
    if cfg.data.augment == "imagenet":
        return imagenet_transform(cfg.data, train=False)(image)
    if tuple(image.shape[1:]) != (size, size):
        image = v2.CenterCrop(size)(v2.Resize(size, antialias=True)(image))
    return image


def predict(run_dir: str | Path, images: list[str], top: int = 5, early_exit: bool = False,
            device: str = "auto") -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """The top classes of each image with their probabilities (softmax of the last delivered head), or with
    `early_exit` of the first head as confident as the run's calibrated threshold. Returns (answers, errors)."""
    from layerwise.early_exit import exits
    from layerwise.train.run import load_delivered

    cfg = config_from_dict(RunDir(run_dir).saved_config())
    compute = precision_for(resolve_device(device), cfg.train.precision)
    got = load_delivered(run_dir, compute)
    threshold = calibrated_threshold(got) if early_exit else None
    answers, errors = [], []
    for path in images:
        try:
            image = load_image(path, cfg)
        except LayerwiseError as e:
            errors.append(str(e))
            continue
        x = Normalize(cfg.data.mean, cfg.data.std, compute.device)(image[None].to(compute.device))
        with torch.no_grad(), compute.autocast():
            probs = torch.stack([z.float().softmax(-1) for z in got.net.eval()(x, max(got.heads), got.heads)], 1)
        answer = len(got.heads) - 1
        if early_exit and threshold is not None:
            answer = int(exits(probs.max(-1).values.cpu(), threshold)[0])
        p, k = probs[0, answer].topk(min(top, probs.shape[-1]))
        entry = {"image": str(path), "head": got.heads[answer]}
        entry["top"] = [
            {"class": got.classes[i], "probability": v} for v, i in zip(p.tolist(), k.tolist(), strict=False)
        ]
        answers.append(entry)
    return answers, errors


def calibrated_threshold(got) -> float | None:
    """The early-exit threshold `layerwise eval --early-exit` calibrated last for this checkpoint and these heads
    (on the run's own validation split, whatever data it then scored): None means answer with the last head. A
    one-line error naming that command when there is none."""
    if len(got.heads) < 2:
        raise LayerwiseError("early exit needs two heads or more; this run delivers one (end to end, or one block)")
    mtime = got.checkpoint.stat().st_mtime_ns
    saved = [
        r
        for r in got.run.read_facts(got.run.path / "early_exit.json").values()
        if r.get("checkpoint") == str(got.checkpoint) and r.get("checkpoint_mtime_ns") == mtime
        and r.get("heads") == got.heads
    ]  # fmt: skip
    if not saved:
        raise LayerwiseError(
            f"no threshold calibrated for this checkpoint yet: run `layerwise eval {got.run.path} --data DATA "
            "--early-exit` first"
        )
    return saved[-1]["calibration"]["threshold"]  # the newest

"""`layerwise export`: a trained run as a file that runs without layerwise (`layerwise predict` is in predict.py).

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

from layerwise.config import RunConfig
from layerwise.data.loaders import Normalize
from layerwise.device import precision_for
from layerwise.errors import LayerwiseError
from layerwise.evaluate import add_to_ensemble
from layerwise.models.staged import StagedNet

FORMATS = ("onnx", "pt2")


class Deployable(nn.Module):
    """uint8 images (N, C, H, W), C = model.in_channels -> (N, classes) scores of `heads[-1]`, or with `ensemble`
    (logits or softmax) the running ensemble over `heads`; with `flip`, each head's logits averaged over the image
    and its mirror (test-time flip, as `layerwise eval --flip`). Holds only the blocks and heads it needs."""

    def __init__(
        self, net: StagedNet, heads: list[int], cfg: RunConfig, ensemble: str | None = None, flip: bool = False
    ):
        super().__init__()
        self.flip = flip
        self.last = max(heads)
        self.blocks = nn.ModuleList(net.blocks[: self.last + 1])
        self.heads = nn.ModuleDict({str(j): net.heads[j] for j in (heads if ensemble else [self.last])})
        self.ensemble = ensemble
        normalize = Normalize(cfg.data.mean, cfg.data.std, torch.device("cpu"))  # training's, as buffers
        self.register_buffer("scale", normalize.scale)
        self.register_buffer("shift", normalize.shift)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.float(), self.scale)
        n = images.shape[0]
        if self.flip:  # the images and their mirrors in one batch
            x = torch.cat([x, x.flip(-1)])
        total = None
        for j, block in enumerate(self.blocks):
            x = block(x)
            if str(j) in self.heads:
                z = self.heads[str(j)](x)
                z = (z[:n] + z[n:]) / 2 if self.flip else z
                total = add_to_ensemble(total, z, self.ensemble) if self.ensemble else z
        return total


def deployable(
    run_dir: str | Path, head: int | None = None, ensemble: bool = False, flip: bool = False
) -> tuple[Deployable, Any]:
    """The run's delivered network as a Deployable on the CPU, in eval mode, and what load_delivered found."""
    from layerwise.delivered import load_delivered

    got = load_delivered(run_dir, precision_for(torch.device("cpu"), "fp32"))
    if head is not None and ensemble:
        raise LayerwiseError("--head and --ensemble exclude each other; choose one")
    if head is not None and head not in got.heads:
        raise LayerwiseError(
            f"--head {head} is not one of the run's trained heads that classify {got.heads}"
            + (" (its own gives no class scores)" if 0 <= head < got.net.J and head not in got.net.classifying else "")
        )
    heads = got.heads if head is None else [h for h in got.heads if h <= head]
    model = Deployable(got.net, heads, got.cfg, got.cfg.train.ensemble if ensemble else None, flip)
    return model.eval().requires_grad_(False), got


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, head: int | None = None,
               ensemble: bool = False, flip: bool = False) -> Path:  # fmt: skip
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
    model, got = deployable(run_dir, head, ensemble, flip)
    size = got.cfg.data.image_size
    example = torch.randint(0, 256, (2, got.cfg.model.in_channels, size, size), dtype=torch.uint8)
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

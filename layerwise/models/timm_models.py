"""Any timm CNN cut into K locally trained modules (`model.arch: timm`, `model.name`): timm is an optional extra
(`pip install 'layerwise[timm]'`).

The cut points are the model's own: `forward_features` run once on a probe image, in evaluation mode, with a hook
on every part, gives the parts it calls in order; a part that holds blocks (no conv or norm of its own: ResNet's
`layer1`, EfficientNet's `blocks` and their stages, RegNet's and ConvNeXt's stages) or one of timm's feature
stages (`feature_info`: DenseNet's `features`) is opened the same way, and each opening is kept only where
running its parts one after the other gives exactly its output. So a residual block, a dense block (its layers
concatenate) or a conv with its norm is never cut inside. The units are balanced into K modules by their FLOPs
(the partition every split network uses); the last module ends in timm's own head (`forward_head`), so the
delivered network is the timm model: `timm_state_dict` gives its state_dict in timm's keys.
"""

from __future__ import annotations

import os
import re
import stat
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from layerwise.config import ModelConfig
from layerwise.errors import LayerwiseError, brief
from layerwise.limits import MAX_WEIGHTS_BYTES, check_file_size
from layerwise.models.heads import module_ends
from layerwise.models.partition import balanced_cut, unit_flops
from layerwise.models.registry import register_model
from layerwise.models.resnet import assemble, check_split
from layerwise.models.staged import StagedNet

SEP = "-"
"""Joins a unit's timm path in its module name (a module name cannot hold a dot; timm's names hold no dash)."""


def import_timm():
    try:
        import timm
    except ImportError:
        raise LayerwiseError("model.arch=timm needs timm: pip install 'layerwise[timm]'") from None
    return timm


class TimmHead(nn.Module):
    """timm's own head: the model with its feature parts taken out (each an nn.Identity), answering with
    `forward_head` (pooling, timm's pre-logits layers, the classifier)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(x)


def called_parts(module: nn.Module, x: torch.Tensor, run) -> list[tuple[str, nn.Module]] | None:
    """The direct children that `run(x)` calls, in call order, or None where one is called twice or none is."""
    order: list[str] = []
    hooks = [c.register_forward_hook(lambda *_, n=n: order.append(n)) for n, c in module.named_children()]
    try:
        run(x)
    finally:
        for h in hooks:
            h.remove()
    if not order or len(order) != len(set(order)):
        return None
    children = dict(module.named_children())
    return [(n, children[n]) for n in order]


def holds_blocks(module: nn.Module) -> bool:
    """A container of blocks: no child of its own is a layer with parameters (a conv, a norm)."""
    children = list(module.children())
    return bool(children) and not any(not list(c.children()) and any(True for _ in c.parameters()) for c in children)


def chained(units: list[tuple[str, nn.Module]], x: torch.Tensor) -> torch.Tensor | None:
    """The units run one after the other on a copy of x (a part may change its input in place), or None where
    one cannot take the one before's output."""
    y = x.clone()
    try:
        for _, unit in units:
            y = unit(y)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None
    return y


def chain(path: str, module: nn.Module, x: torch.Tensor, stages: set[str], run) -> list[tuple[str, nn.Module]] | None:
    """The parts that `run(x)` calls (module's forward or forward_features), each opened (`opened`), as a chain
    of (timm path, part) that gives run(x) exactly; None where they do not."""
    parts = called_parts(module, x.clone(), run)
    if parts is None:
        return None
    units, y = [], x.clone()
    for name, part in parts:
        inner = opened(f"{path}{name}", part, y, stages)
        y = chained(inner, y)
        if y is None:
            return None
        units += inner
    return units if torch.equal(y, run(x.clone())) else None


def opened(path: str, module: nn.Module, x: torch.Tensor, stages: set[str]) -> list[tuple[str, nn.Module]]:
    """`module`'s units: its parts (`chain`) where it holds blocks or a feature stage and they chain, else the
    module whole."""
    holds_stage = any(f"{path}.{n}" in stages for n, _ in module.named_children())
    units = chain(f"{path}.", module, x, stages, module) if holds_blocks(module) or holds_stage else None
    return units or [(path, module)]


def feature_units(model: nn.Module, image: tuple[int, int, int]) -> list[tuple[str, nn.Module]]:
    """The timm model's forward_features as a chain of (timm path, part), on one probe image of shape `image`."""
    stages = {info["module"] for info in getattr(model, "feature_info", [])}
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.randn(1, *image, generator=torch.Generator().manual_seed(0))
            units = chain("", model, x, stages, model.forward_features)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as e:
        raise LayerwiseError(f"its forward_features fails on a {image} image ({brief(str(e))})") from None
    finally:
        model.train(was)
    if units is None:
        raise LayerwiseError("its forward_features is more than its parts one after the other")
    return units


def cifar_stem(model: nn.Module, units: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """model.stem=cifar, in place: the first conv at stride 1 with 'same' padding (its weights kept), and every
    unit that is a bare max-pool (a stem's: blocks hold theirs inside) dropped for an nn.Identity."""
    conv = next((m for _, u in units for m in u.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise LayerwiseError("model.stem=cifar found no conv in the timm model's first parts")
    conv.stride, conv.padding = (1, 1), "same"
    out = []
    for path, unit in units:
        if isinstance(unit, nn.MaxPool2d):
            parent, _, name = path.rpartition(".")
            unit = nn.Identity()
            setattr(model.get_submodule(parent), name, unit)
        out.append((path, unit))
    return out


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """model.weights: a .safetensors file, or a torch file of tensors (weights_only); size-capped, a regular file,
    nothing of it run."""
    file = Path(path)
    try:
        info = os.stat(file)
    except OSError as e:
        raise LayerwiseError(f"model.weights {brief(path, 80)}: {e.strerror or type(e).__name__}") from None
    if not stat.S_ISREG(info.st_mode):
        raise LayerwiseError(f"model.weights {brief(path, 80)} is not a regular file")
    check_file_size(f"model.weights {brief(path, 80)}", info.st_size, limit=MAX_WEIGHTS_BYTES)
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(file, device="cpu")
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign or truncated file fails in many ways
        raise LayerwiseError(f"model.weights {brief(path, 80)} is unreadable ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LayerwiseError(f"model.weights {brief(path, 80)} holds no state_dict of tensors")
    return state


def load_weights(model: nn.Module, path: str) -> None:
    """Load model.weights into the timm model: every key must fit, but a classifier sized for other classes,
    which keeps its initialisation (fine-tuning)."""
    state, own = read_weights(path), model.state_dict()
    classifier = model.pretrained_cfg.get("classifier") or ""
    other = {k for k, v in state.items() if k in own and k.startswith(f"{classifier}.") and v.shape != own[k].shape}
    kept = {k: v for k, v in state.items() if k not in other}
    missing = sorted(set(own) - set(kept) - other)
    extra = sorted(set(kept) - set(own))
    wrong = sorted(k for k in set(kept) & set(own) if kept[k].shape != own[k].shape)
    if missing or extra or wrong:
        first = (missing or extra or wrong)[0]
        raise LayerwiseError(
            f"model.weights {brief(path, 80)} does not fit timm's {model.default_cfg.get('architecture', '')}: "
            f"{len(missing)} keys missing, {len(extra)} unexpected, {len(wrong)} of another shape (first: {first})"
        )
    model.load_state_dict({**own, **kept})


@register_model("timm")
def timm_model(cfg: ModelConfig, num_classes: int, image_size: int = 224) -> StagedNet:
    """timm's model.name for num_classes, cut into model.split = K modules at its block boundaries, balanced by
    FLOPs at image_size; model.stem=cifar adapts its stem to 32 px images; model.weights loads a local file."""
    timm = import_timm()
    ambient = torch.get_default_device()  # meta where the library sizes a network without building it
    with torch.device("cpu"):  # the probe that finds the cut points needs real numbers
        try:
            model = timm.create_model(cfg.name, pretrained=False, num_classes=num_classes, in_chans=cfg.in_channels)
        except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise LayerwiseError(
                f"bad config: model.name={brief(cfg.name)}: timm cannot build it ({brief(str(e))})"
            ) from None
        if cfg.weights:
            load_weights(model, cfg.weights)
        image = (cfg.in_channels, image_size, image_size)
        try:
            units = feature_units(model, image)
        except LayerwiseError as e:
            raise LayerwiseError(f"model.name={cfg.name} cannot be cut into modules: {e}") from None
    if cfg.stem == "cifar":
        units = cifar_stem(model, units)
    for path in dict.fromkeys(p.split(".")[0] for p, _ in units):  # the head keeps what forward_head reads
        setattr(model, path, nn.Identity())
    check_split(cfg, len(units), f"{len(units)} units of {cfg.name} (its stem parts and blocks)")
    costs, shapes = unit_flops([u for _, u in units], image)
    if any(len(s) != 4 for s in shapes):
        raise LayerwiseError(f"model.name={cfg.name} cannot be cut into modules: its features are not maps")
    ends = module_ends(cfg, None, lambda: balanced_cut(costs, cfg.split))
    named = [(p.replace(".", SEP), u) for p, u in units]
    net = assemble(named, ends, TimmHead(model), [(s[1], s[2]) for s in shapes], cfg, num_classes)
    return net if ambient.type == "cpu" else net.to(ambient)


def timm_state_dict(net: StagedNet) -> dict[str, torch.Tensor]:
    """The delivered network of a split timm model (every module and timm's head) as the state_dict of
    `timm.create_model(name, num_classes=...)` (with the same stem change, for model.stem=cifar)."""
    state = OrderedDict()
    last = len(net.blocks) - 1
    for key, value in net.state_dict().items():
        if match := re.fullmatch(r"blocks\.\d+\.([^.]+)\.(.+)", key):
            state[f"{match[1].replace(SEP, '.')}.{match[2]}"] = value
        elif match := re.fullmatch(rf"heads\.{last}\.model\.(.+)", key):
            state[match[1]] = value
    return state

"""Your own network, trained greedily: a list of stages (any nn.Modules) and either your heads or heads the
library builds from each stage's output shape.

A run rebuilds the network for `eval`, `export`, `predict` and resume from an import path stored in its config
(`model.builder: package.module:function`, with `model.builder_args`). Importing it runs code, so a builder that a
file names (a config file, a received run directory) is imported only when asked: layerwise.trust.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

from layerwise.config import IMPORT_PATH, ModelConfig
from layerwise.errors import LayerwiseError
from layerwise.models.heads import HeadSpec, make_head, module_ends
from layerwise.models.heads import InfoProHead as InfoProHead  # where it lived before heads.py
from layerwise.models.registry import register_model
from layerwise.models.staged import StagedNet, classifies


def staged_from_stages(
    stages: Sequence[nn.Module],
    heads: Sequence[nn.Module] | None,
    cfg: ModelConfig,
    num_classes: int,
    image_size: int,
) -> StagedNet:
    """A StagedNet of the stages with `heads`, or with model.head's heads sized from each stage's output, after
    checking on one blank image that the stages chain and every head gives (batch, num_classes) scores."""
    stages = list(stages)
    if not stages or not all(isinstance(s, nn.Module) for s in stages):
        raise LayerwiseError("a network needs a non-empty list of stages, each an nn.Module")
    if heads is not None and not isinstance(heads, (list, tuple, nn.ModuleList)):
        raise LayerwiseError(f"heads must be a list with one nn.Module per stage, not {type(heads).__name__}")
    if heads is not None and (len(heads) != len(stages) or not all(isinstance(h, nn.Module) for h in heads)):
        raise LayerwiseError(f"give one head (an nn.Module) per stage: {len(stages)} stages, {len(heads)} heads")
    shapes = output_shapes(stages, (cfg.in_channels, image_size, image_size))
    if heads is None:
        module_ends(cfg, None, lambda: list(range(1, len(stages) + 1)))  # the stages are the modules: no other cut
        heads = []
        for j, shape in enumerate(shapes):
            if len(shape) != 4:
                raise LayerwiseError(
                    f"stage {j} ({type(stages[j]).__name__}) gives {_shape(shape)}; the library's heads need "
                    "(batch, channels, height, width) maps: pass your own heads"
                )
            side = shape[2] if shape[2] == shape[3] else 0
            heads.append(make_head(HeadSpec(shape[1], num_classes, cfg, side, j, len(stages))))
    net = StagedNet(stages, list(heads))
    for j, (head, shape) in enumerate(zip(net.heads, shapes, strict=True)):
        try:
            got = tuple(_probe(head, torch.zeros(shape, device=_device_of(head, stages[j]))).shape)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise LayerwiseError(
                f"head {j} ({type(head).__name__}) cannot take stage {j}'s {_shape(shape)} output: {detail}"
            ) from None
        if classifies(head) and got != (shape[0], num_classes):
            raise LayerwiseError(
                f"head {j} ({type(head).__name__}) returns {_shape(got)} for stage {j}'s {_shape(shape)}, not "
                f"(batch, {num_classes}) class scores"
            )
    return net


def output_shapes(stages: Sequence[nn.Module], image: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each stage's output shape for a batch of 2 blank images (eval mode, no gradient, nothing changes); a
    stage that cannot take the one before's output is named with both shapes."""
    shape, shapes = (2, *image), []
    for j, stage in enumerate(stages):
        x = torch.zeros(shape, device=_device_of(stage))
        try:
            out = _probe(stage, x)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            given = f"the {_shape(shape)} images" if j == 0 else f"stage {j - 1}'s {_shape(shape)} output"
            expects = _expected_input(stage)
            detail = f"it expects {expects}" if expects else str(e).strip().splitlines()[0][:160]
            raise LayerwiseError(f"stage {j} ({type(stage).__name__}) cannot take {given}: {detail}") from None
        if not isinstance(out, torch.Tensor):
            raise LayerwiseError(f"stage {j} ({type(stage).__name__}) returns {type(out).__name__}, not a tensor")
        shape = tuple(out.shape)
        shapes.append(shape)
    return shapes


def _probe(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = module.training
    try:
        with torch.no_grad():
            return module.eval()(x)
    finally:
        module.train(was)


def _device_of(*modules: nn.Module) -> torch.device:
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            return t.device
    return torch.empty(0).device  # the default device: meta while the network is sized


def _expected_input(stage: nn.Module) -> str | None:
    first = next((m for m in stage.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d):
        return f"{first.in_channels} input channels"
    if isinstance(first, nn.Linear):
        return f"{first.in_features} input features"
    return None


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def import_builder(path: str) -> Callable:
    """The function at `package.module:function`, imported (the current directory first on the path, as
    `python -m` has it); every failure one line naming it."""
    if not IMPORT_PATH.fullmatch(path):
        raise LayerwiseError(f"model.builder must be an import path package.module:function (got {path!r})")
    module_name, attr = path.split(":")
    if os.getcwd() not in sys.path:  # last: the current directory never shadows an installed module
        sys.path.append(os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise LayerwiseError(
                f"model.builder {path}: no module {e.name} in the current directory or on PYTHONPATH"
            ) from None
        raise LayerwiseError(f"model.builder {path}: importing {module_name} failed ({e})") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module may fail in any way (argparse exits)
        raise LayerwiseError(f"model.builder {path}: importing {module_name} raised {_error(e)}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise LayerwiseError(f"model.builder {path}: {module_name} has no {attr}")
        target = getattr(target, part)
    if not callable(target):
        raise LayerwiseError(f"model.builder {path} is not a function")
    return target


def import_path(builder: Callable) -> str:
    """`module:qualname` of a function defined at a module's top level; a script's own functions are named
    by the script's file (keep its training under `if __name__ == "__main__":`)."""
    if isinstance(builder, str):
        return builder
    module, name = getattr(builder, "__module__", None), getattr(builder, "__qualname__", "")
    if module == "__main__":  # `python -m package.script` names it; `python script.py` by its file
        main = sys.modules["__main__"]
        spec, path = getattr(main, "__spec__", None), getattr(main, "__file__", None)
        if spec is None and path is None:
            raise LayerwiseError("define the network's builder in a file (a module or script), not interactively")
        if spec is None and os.path.dirname(os.path.abspath(path)) != os.getcwd():
            raise LayerwiseError(
                f"run {os.path.basename(path)} from its own folder, {os.path.dirname(os.path.abspath(path))} (or as "
                "python -m package.module), so that `layerwise eval` and the others can import its builder later"
            )
        module = spec.name if spec is not None else os.path.splitext(os.path.basename(path))[0]
    if not module or "<" in name:
        raise LayerwiseError(f"the builder {builder!r} must be a function defined at a module's top level")
    return f"{module}:{name}"


@register_model("custom")
def custom(cfg: ModelConfig, num_classes: int, image_size: int = 32) -> StagedNet:
    """model.builder's function, called with model.builder_args (and num_classes, if it takes that). It returns
    a list of stages, a (stages, heads) pair, or a StagedNet."""
    if not cfg.builder:
        raise LayerwiseError("model.arch=custom needs model.builder, an import path package.module:function")
    builder = import_builder(cfg.builder)
    kwargs = dict(cfg.builder_args)
    try:
        accepts = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        accepts = {}
    if "num_classes" in accepts:
        kwargs["num_classes"] = num_classes
    try:
        made = builder(**kwargs)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's builder may fail in any way
        raise LayerwiseError(f"model.builder {cfg.builder} raised {_error(e)}") from None
    if isinstance(made, StagedNet):
        return staged_from_stages(made.blocks, made.heads, cfg, num_classes, image_size)
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], (list, tuple, nn.ModuleList)):
        return staged_from_stages(made[0], made[1], cfg, num_classes, image_size)
    if isinstance(made, (list, tuple, nn.ModuleList)):
        return staged_from_stages(made, None, cfg, num_classes, image_size)
    raise LayerwiseError(
        f"model.builder {cfg.builder} returned {type(made).__name__}; return a list of stages (nn.Modules), a "
        "(stages, heads) pair or a StagedNet"
    )


def _error(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

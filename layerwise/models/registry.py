"""Architectures by name. A builder takes the model config, the number of classes and the side of the images the
network will see, and returns a StagedNet; `@register_model("name")` makes `model.arch: name` build it.

The library's own architectures register when `layerwise.models` is imported; `architectures()` lists them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from layerwise.errors import LayerwiseError, brief
from layerwise.registering import Registry

if TYPE_CHECKING:
    from layerwise.config import ModelConfig
    from layerwise.models.staged import StagedNet

Builder = Callable[["ModelConfig", int, int], "StagedNet"]
_BUILDERS: Registry[Builder] = Registry("an architecture")


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register `builder(cfg, num_classes, image_size) -> StagedNet` as the architecture `name`."""
    return _BUILDERS.register(name)


def architectures() -> list[str]:
    """Names of every registered architecture, sorted. The library's own are registered already: importing this
    module runs `layerwise/models/__init__.py` first, which imports them."""
    return _BUILDERS.names()


def build_model(cfg: ModelConfig, num_classes: int, image_size: int = 32) -> StagedNet:
    """Build the staged network a ModelConfig describes. Use `with torch.device("meta")` to size it for free."""
    if cfg.arch not in architectures():
        raise LayerwiseError(
            f"bad config: model.arch must be one of {', '.join(architectures())} (got {brief(cfg.arch, 60)})"
        )
    return _BUILDERS.entries[cfg.arch](cfg, num_classes, image_size)

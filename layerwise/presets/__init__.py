"""Registry of named presets: the paper's recipes as YAML data, one file per preset in this folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from layerwise.config import RunConfig, config_from_dict, load_yaml, merge
from layerwise.errors import LayerwiseError
from layerwise.limits import SMALL_FILE
from layerwise.safe_io import read_text


def list_presets() -> list[str]:
    """Names of every registered preset, sorted."""
    folder = resources.files(__package__)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping a preset file holds, with its name filled in."""
    if name not in list_presets():
        raise LayerwiseError(
            f"unknown preset {name!r}; run `layerwise presets` to list them ({', '.join(list_presets())})"
        )
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text()
    return {"preset": name, **yaml.safe_load(text)}


def load_preset(name: str) -> RunConfig:
    return config_from_dict(preset_dict(name))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file. It may name a `preset:` to start from and override any part of it."""
    path = Path(path)
    if not path.is_file():
        raise LayerwiseError(f"config file {path} not found; pass an existing YAML file to --config")
    values = load_yaml(read_text(path, SMALL_FILE), f"config file {path}")
    if not isinstance(values, dict):
        raise LayerwiseError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
    if "preset" in values:
        values = merge(preset_dict(str(values["preset"])), values)
    return values


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[dict[str, Any]] = (),
    base: dict[str, Any] | None = None,
) -> RunConfig:
    """Preset (or `base`, a saved run's config), then config file, then overrides (later wins); validated once."""
    values: dict[str, Any] = preset_dict(preset) if preset else dict(base or {})
    if config_file is not None:
        values = merge(values, read_config_file(config_file))
    for override in overrides:
        values = merge(values, override)
    return config_from_dict(values)

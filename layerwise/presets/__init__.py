"""Registry of named presets: the paper's recipes as YAML data, one file per preset in this folder."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from layerwise.config import RunConfig, config_from_dict, given_keys, load_yaml, merge, refuse_idle
from layerwise.errors import LayerwiseError, brief
from layerwise.limits import SMALL_FILE
from layerwise.safe_io import read_text
from layerwise.trust import CONFIG_FILE_FIX, check_trusted


def list_presets() -> list[str]:
    """Names of every registered preset, sorted."""
    folder = resources.files(__package__)
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping a preset file holds, with its name filled in."""
    if name not in list_presets():
        raise LayerwiseError(
            f"unknown preset {brief(name, 60)}; run `layerwise presets` to list them ({', '.join(list_presets())})"
        )
    text = resources.files(__package__).joinpath(f"{name}.yaml").read_text()
    return {"preset": name, **load_yaml(text, f"preset {name}")}


def load_preset(name: str) -> RunConfig:
    return config_from_dict(preset_dict(name))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file. It may name a `preset:` to start from and override any part of it."""
    return _with_preset(_file_values(path))


def _with_preset(values: dict[str, Any]) -> dict[str, Any]:
    return merge(preset_dict(str(values["preset"])), values) if "preset" in values else values


def _file_values(path: str | Path) -> dict[str, Any]:
    """What a config file itself says, without the preset it names."""
    path = Path(path)
    if not path.is_file():
        raise LayerwiseError(f"config file {path} not found; pass an existing YAML file to --config")
    values = load_yaml(read_text(path, SMALL_FILE), f"config file {path}")
    if not isinstance(values, dict):
        raise LayerwiseError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
    return values


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[dict[str, Any]] = (),
    base: dict[str, Any] | None = None,
    trust_code: bool = False,
) -> RunConfig:
    """Preset (or `base`, a saved run's config), then config file, then overrides (later wins); validated once.

    A network builder that the config file names (model.builder) is refused, in one line naming the file, the
    function and its arguments, unless `trust_code` (--trust-code) or LAYERWISE_TRUST_CODE=1: the file may come
    from someone else. A builder in `overrides` (--set, or Python) is the caller's own and needs neither. A setting
    the config file or the overrides give that does nothing in the result is refused (config.idle_settings); the
    presets hold none (tested), and what a saved run's config (`base`) holds is never refused."""
    cfg, named_by = resolve(preset, config_file, overrides, base)
    if named_by is not None and not trust_code:
        check_trusted(cfg.model, named_by, CONFIG_FILE_FIX)
    return cfg


def resolve(
    preset: str | None, config_file: str | Path | None, overrides: list[dict[str, Any]], base: dict[str, Any] | None
) -> tuple[RunConfig, str | None]:
    """resolve_config's config, unchecked for trust, and which file names its builder ("config file PATH"), or
    None when none does (a library architecture, or a builder the overrides give). Imports nothing."""
    values: dict[str, Any] = preset_dict(preset) if preset else dict(base or {})
    given: set[str] = set()  # the settings the user typed: the config file's own and the overrides
    named_by = None
    if config_file is not None:
        own = _file_values(config_file)
        values = merge(values, _with_preset(own))
        given |= given_keys(own)
        named_by = f"config file {config_file}" if _names_builder(own) else None
    for override in overrides:
        values = merge(values, override)
        given |= given_keys(override)
        named_by = None if _names_builder(override) else named_by
    cfg = config_from_dict(values)
    refuse_idle(cfg, given)
    return cfg, named_by


def _names_builder(values: dict[str, Any]) -> bool:
    return isinstance(values.get("model"), dict) and "builder" in values["model"]

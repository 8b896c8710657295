"""The Python API for your own network: `config_for` describes the run, `fit` trains it.

    cfg = layerwise.config_for(stages, preset="demo", model={"head": "paper", "k": 2})
    layerwise.fit(cfg, "runs/mine", data="images/")

`stages` is a function at a module's (or script's) top level returning a list of nn.Modules, or
(stages, heads), or a StagedNet; the run stores its import path and rebuilds it for eval, export and predict
(which ask for --trust-code). Everything a preset run has applies: resume, torchrun, the prefix cache, bf16.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from layerwise.config import RunConfig
from layerwise.models.custom import import_path


def config_for(
    builder: Callable | str,
    *,
    args: dict[str, Any] | None = None,
    preset: str = "demo",
    **sections: dict[str, Any],
) -> RunConfig:
    """A run of `builder`'s network (a function, or its import path `package.module:function`) called with
    `args`, with the data and training settings of `preset` (its model settings describe its own network and
    are not taken); `sections` (model=, data=, train=) override any setting."""
    from layerwise.presets import preset_dict, resolve_config

    path = import_path(builder)
    recipe = preset_dict(preset)
    values = {
        "preset": "custom",
        "description": f"{path} with the data and training settings of preset {preset}",
        "model": {"arch": "custom", "builder": path, "builder_args": dict(args or {})},
        "data": recipe.get("data", {}),
        "train": recipe.get("train", {}),
    }
    return resolve_config(None, None, [sections], base=values)


def fit(cfg: RunConfig, out: str | Path, data: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Train cfg's network into the run directory `out` (resuming it with `resume`), write its report.html, and
    return the summary. Under torchrun every process calls it; rank 0 writes the files."""
    from layerwise.distributed import from_env
    from layerwise.report import report_finished_run
    from layerwise.train.run import train

    log = logging.getLogger("layerwise")
    shown = None
    if not log.handlers and not logging.getLogger().handlers:  # nothing set up: show progress as the CLI does
        shown = logging.StreamHandler(sys.stderr)
        shown.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(shown)
        log.setLevel(logging.INFO if from_env().is_main else logging.WARNING)
    try:
        summary = train(cfg, out, data, resume)
        if from_env().is_main:
            report_finished_run(out)
        return summary
    finally:
        if shown is not None:
            log.removeHandler(shown)
            log.setLevel(logging.NOTSET)

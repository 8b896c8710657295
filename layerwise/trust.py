"""Whether code that a file names may be imported: `--trust-code`, or LAYERWISE_TRUST_CODE=1.

A config of your own network names the function that builds it (`model.builder: package.module:function`, called
with `model.builder_args`). Importing that module runs its code, and the function can be any importable one
(`os:system` included), so a builder named by a file someone may have sent you, a config file or a received
run directory's config.yaml, is imported only when you opt in. A builder you give on the command line
(`--set model.builder=...`) or from Python (`layerwise.config_for`, `fit`) is your own act and needs nothing.
docs/security.md lists every place where a string from a file reaches an import.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from layerwise.config import ModelConfig
from layerwise.errors import LayerwiseError, brief

TRUST_VARIABLE = "LAYERWISE_TRUST_CODE"

CONFIG_FILE_FIX = (
    "; a config file's builder needs it since 2026-12, as a received run's does (one you give with --set "
    "model.builder=... does not)"
)
"""The end of the refusal of a builder that a config file names: training such a file used to import it."""


def trusted() -> bool:
    """Whether the user opted in to importing code that a file names."""
    return os.environ.get(TRUST_VARIABLE, "") == "1"


def code_named(cfg: ModelConfig) -> str | None:
    """What building cfg's network would run, in words, or None when it runs no code of the config's choosing
    (a library architecture). Imports nothing."""
    if cfg.arch != "custom":
        return None
    module = cfg.builder.split(":")[0]
    return f"import {module} (running its top-level code) and call {cfg.builder} with {brief(cfg.builder_args)}"


def check_trusted(cfg: ModelConfig, where: str, fix: str = "") -> None:
    """Refuse, in one line naming `where` (the file or run that names the code), to go on to import cfg's builder
    unless the user opted in; `fix` adds another way out to the advice."""
    code = code_named(cfg)
    if code is not None and not trusted():
        raise LayerwiseError(
            f"{where} names code to run: loading it would {code}; if you trust where it came from, pass "
            f"--trust-code (or set {TRUST_VARIABLE}=1){fix}"
        )


@contextmanager
def trusting(on: bool) -> Iterator[None]:
    """LAYERWISE_TRUST_CODE=1 while the block runs, when `on` (--trust-code); as it was afterwards."""
    before = os.environ.get(TRUST_VARIABLE)
    if on:
        os.environ[TRUST_VARIABLE] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TRUST_VARIABLE, None)
        else:
            os.environ[TRUST_VARIABLE] = before

"""Run directories: their files read and written safely, and checkpoints loaded without unpickling objects.

Training writes a run directory and serving reads it (eval, export, predict, report, early exit); both import this
module, which imports nothing of either.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import stat
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from layerwise._version import __version__
from layerwise.config import load_yaml
from layerwise.errors import LayerwiseError, one_line
from layerwise.limits import METRICS_FILE, RUN_FILE, SMALL_FILE
from layerwise.locks import RunLock, exclusive
from layerwise.safe_io import folder, open_append, read_text, write_text

log = logging.getLogger("layerwise")


class Checkpoint(NamedTuple):
    """A checkpoint's parts: its JSON metadata, the network's state_dict, and for an epoch checkpoint the
    optimizer's state and train.ema's average (None where absent)."""

    meta: dict[str, Any]
    model: dict
    optimizer: dict | None
    average: dict | None


def read_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint file's parts. Never unpickles arbitrary objects. Checkpoints written before 2026-12-07 kept
    train.ema's average inside the optimizer's state, under "average": it is read from there."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            payload = torch.load(f, map_location="cpu", weights_only=True)
        optimizer, average = payload.get("optimizer"), payload.get("average")
        if average is None and isinstance(optimizer, dict) and "average" in optimizer:  # the older layout
            average, optimizer = optimizer["average"], {k: v for k, v in optimizer.items() if k != "average"}
        return Checkpoint(json.loads(payload["meta"]), payload["model"], optimizer, average)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise LayerwiseError(
            f"checkpoint {path} is unreadable ({type(e).__name__}); delete it: training resumes and eval "
            "reads from the newest checkpoint left"
        ) from None


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict, dict | None]:
    """(meta, model state_dict, optimizer state_dict or None): read_checkpoint's first three parts."""
    return read_checkpoint(path)[:3]


class RunDir:
    """The files of one run:

    config.yaml     the resolved config          classes.json   class names, in label order
    run.json        versions, device, data       metrics.jsonl  one line per epoch of every block
    checkpoints/    last.pt (end of each epoch), block{j}.pt (each finished block), final.pt
    summary.json    per-block table and totals, written when the run ends
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.config = self.path / "config.yaml"
        self.classes = self.path / "classes.json"
        self.metrics = self.path / "metrics.jsonl"
        self.summary = self.path / "summary.json"
        self.info = self.path / "run.json"
        self.evals = self.path / "eval.json"
        self.last = self.checkpoints / "last.pt"
        self.final = self.checkpoints / "final.pt"
        self.lock_file = self.path / ".lock"

    def is_run(self) -> bool:
        return self.config.is_file()

    def block(self, j: int) -> Path:
        return self.checkpoints / f"block{j}.pt"

    def check_new(self) -> None:
        """Refuse to start a new run in a folder that already holds something (a lock file alone is nothing)."""
        if self.is_run():
            raise LayerwiseError(
                f"{self.path} already holds a run; pass --resume to continue it, or choose another --out"
            )
        if self.path.exists() and (not self.path.is_dir() or any(p != self.lock_file for p in self.path.iterdir())):
            raise LayerwiseError(f"{self.path} exists and is not an empty folder; choose another --out")

    def lock(self) -> RunLock:
        """Become the run directory's only writer, or refuse with a line naming the process that is."""
        return RunLock(self.lock_file)

    def create(self, config_yaml: str) -> None:
        with folder(self.path, "checkpoints", create=True):
            pass
        self.write_text(self.config, config_yaml)

    def saved_config(self) -> dict[str, Any]:
        if not self.is_run():
            raise LayerwiseError(f"{self.path} holds no layerwise run (no config.yaml); check the path")
        saved = load_yaml(read_text(self.config, SMALL_FILE), str(self.config))
        model = saved.get("model") if isinstance(saved, dict) else None
        if isinstance(model, dict) and model.get("arch") == "vgg11" and "classifier_dropout" not in model:
            model["classifier_dropout"] = 0.5  # saved before the setting existed, when VGG's classifier had 0.5
        return saved

    def read_classes(self) -> list[str]:
        try:
            classes = json.loads(read_text(self.classes, RUN_FILE))
        except (OSError, LayerwiseError, RecursionError, ValueError) as e:
            raise LayerwiseError(f"{self.classes} is missing or unreadable ({type(e).__name__}); restore it") from None
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise LayerwiseError(f"{self.classes} must be a JSON list of class names; restore it")
        return classes

    def read_info(self) -> dict[str, Any]:
        """run.json, or {} when it is missing or unreadable (it only records facts about the run)."""
        return self.read_facts(self.info)

    def read_evals(self) -> dict[str, Any]:
        """eval.json: what `layerwise eval` found, by data path ({} when it has not run)."""
        return self.read_facts(self.evals)

    def record(self, path: Path, data: str, result: dict[str, Any]) -> None:
        """Add `result` under `data` to the JSON file at path (eval.json, early_exit.json), newest last, merging
        with what concurrent writers add (they take turns on a lock). Best effort: a run directory that cannot
        be written (shared, read-only) only gets a warning."""
        try:
            with exclusive(self.path / ".record.lock"):
                facts = self.read_facts(path)
                facts.pop(data, None)
                self.write_json(path, {**facts, data: result})
        except (LayerwiseError, OSError) as e:
            log.warning("the result was not saved in the run: %s", one_line(e))

    @staticmethod
    def read_facts(path: Path) -> dict[str, Any]:
        try:
            facts = json.loads(read_text(path, RUN_FILE))
        except (OSError, LayerwiseError, RecursionError, ValueError):
            return {}
        return facts if isinstance(facts, dict) else {}

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete metrics line; a line cut short by a crash is skipped."""
        if not self.metrics.is_file():
            return []
        rows = []
        for line in read_text(self.metrics, METRICS_FILE).splitlines():
            try:
                row = json.loads(line)
            except (RecursionError, ValueError):
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    def last_finished_block(self) -> Path | None:
        """The checkpoint of the highest finished greedy block, to resume from when last.pt is gone."""
        blocks = sorted(self.checkpoints.glob("block*.pt"), key=lambda p: int(p.stem[len("block") :]))
        return blocks[-1] if blocks else None

    def keep_metrics(self, keep) -> None:
        """Drop metric lines the last checkpoint does not cover (written just before an interruption)."""
        rows = [r for r in self.read_metrics() if keep(r)]
        self.write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append and flush to disk before the epoch's checkpoint, so no checkpoint is ahead of its metrics."""
        with open_append(self.metrics, self.path) as f:
            f.write((json.dumps(row) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def write_text(self, path: Path, text: str) -> None:
        """Write a file of the run atomically, following no link below the run directory."""
        write_text(path, text, self.path)

    def write_json(self, path: Path, value: Any) -> None:
        self.write_text(path, json.dumps(value, indent=2) + "\n")

    def log_handler(self) -> logging.Handler:
        """A handler appending to train.log, which is never a link."""
        return RunLogHandler(self.path / "train.log", self.path)

    def remove_cache_files(self) -> None:
        """Delete the prefix cache files an interrupted run left in RUN/cache (never through a link)."""
        if not (self.path / "cache").is_dir():
            return
        with folder(self.path, "cache") as fd:
            for name in os.listdir(fd):
                if name.startswith("prefix") and name.endswith(".bin"):
                    os.unlink(name, dir_fd=fd)


class RunLogHandler(logging.FileHandler):
    """logging.FileHandler over safe_io.open_append: train.log planted as a link is refused, not followed."""

    def __init__(self, path: Path, root: Path):
        self.root = root
        super().__init__(path, encoding="utf-8")

    def _open(self):
        return io.TextIOWrapper(open_append(Path(self.baseFilename), self.root), encoding="utf-8")


def run_info(device: torch.device, data, description: str, where) -> dict[str, Any]:
    """run.json's facts about a run as it starts (or resumes): versions, device, processes, data, time."""
    return {
        "layerwise": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "processes": where.world_size,
        "data": str(data) if data is not None else "built-in sample",
        "data_path": str(Path(data).resolve()) if data is not None else None,
        "data_description": description,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torchelastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),  # torchrun's job; its restarts resume
    }

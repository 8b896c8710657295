"""Training: strategies and their stages, the shared loop, checkpoints and whole runs.

The names below load on first use, so that importing one of its modules (bench imports `layerwise.train.stage`)
does not load the run orchestrator (layerwise.train.run). Stage and plan_stages live in layerwise.stages.
"""

from importlib import import_module

from layerwise.stages import Stage, plan_stages

_WHERE = {
    "Run": "run",
    "train": "run",
    "StageModule": "stage",
    "StageTraining": "loop",
    "train_epoch": "loop",
    "summary_table": "metrics",
}
__all__ = ["Run", "Stage", "StageModule", "StageTraining", "plan_stages", "summary_table", "train", "train_epoch"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)

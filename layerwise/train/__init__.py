"""Training: strategies and their stages, the shared loop, checkpoints and whole runs.

The names below load on first use, so that serving code importing `layerwise.train.checkpoint` or
`layerwise.train.stage` does not load the run orchestrator (layerwise.train.run).
"""

from importlib import import_module

_WHERE = {
    "Run": "run",
    "train": "run",
    "Stage": "stage",
    "StageModule": "stage",
    "plan_stages": "stage",
    "StageTraining": "loop",
    "train_epoch": "loop",
    "summary_table": "summary",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)

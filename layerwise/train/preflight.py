"""The checks of a run that need more than its config: the built network, the data and the installed packages.
They run on every process once the network and the data are built, before anything is written; what the config
alone decides is checked when it is read (layerwise.config)."""

from __future__ import annotations

from layerwise.config import RunConfig
from layerwise.data import DataBundle
from layerwise.errors import LayerwiseError
from layerwise.models.staged import StagedNet
from layerwise.train.metrics import Board


def preflight(cfg: RunConfig, data: DataBundle, net: StagedNet) -> None:
    """Refuse, in one line, a run whose settings do not fit its network, data or installed packages."""
    train = cfg.train
    if train.tensorboard:
        Board.check()
    if train.min_gain is not None and data.val is None:
        raise LayerwiseError(
            "train.min_gain compares the blocks' validation top-1, and this run has none: "
            "give --val-data, or a data.val_size above 0"
        )
    silent = [j for j in range(net.J) if j not in net.classifying]
    if silent and (net.J - 1 in silent or train.mode != "decoupled" or train.placement != "single"):
        raise LayerwiseError(
            f"the heads of blocks {', '.join(map(str, silent))} give no class scores (model.head={cfg.model.head}): "
            "such heads train only with every module at once in one pipeline (train.mode=decoupled, "
            "train.placement=single), and the last head must classify"
        )
    if train.block_epochs and len(train.block_epochs) != net.J:
        raise LayerwiseError(
            f"train.block_epochs has {len(train.block_epochs)} numbers for a network of {net.J} blocks; "
            "give one per block"
        )

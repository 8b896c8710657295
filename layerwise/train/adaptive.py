"""train.min_gain (adaptive depth): after each greedy block, stop when its head gained too little over the last."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from layerwise.errors import LayerwiseError
from layerwise.models.staged import StagedNet, count
from layerwise.stages import Stage
from layerwise.train.metrics import final_scores


class AdaptiveDepth:
    """The validation top-1 of each stage's last epoch so far, and train.min_gain's decision once taken
    (`stopped`): None while the run goes on, and always without train.min_gain."""

    def __init__(self, min_gain: float | None, finished: dict[int, float], stages: list[Stage], checkpoints: Path):
        """`finished`: the validation top-1 of the stages a resumed run has done (`stages`); `checkpoints`: where
        the run keeps them."""
        self.min_gain, self.val_top1, self.checkpoints = min_gain, dict(finished), checkpoints
        self.stopped: dict[str, Any] | None = next(filter(None, map(self.decide, stages)), None)

    @staticmethod
    def finished(rows: list[dict]) -> dict[int, float]:
        """The validation top-1 of each stage's last epoch in metrics.jsonl's `rows` (what a resumed run has)."""
        return {r["stage"]: r["val"]["top1"] for r in rows if "val" in r}

    def record(self, row: dict[str, Any]) -> None:
        if "val" in row:
            self.val_top1[row["stage"]] = row["val"]["top1"]

    def decide(self, stage: Stage) -> dict[str, Any] | None:
        """After greedy block j > 0: if its head's validation top-1 gained less than min_gain points over block
        j-1's, the decision to stop and deliver blocks 0..j-1 (kept in `stopped`); else None."""
        min_gain = self.min_gain
        if min_gain is None or not stage.finishes_block or stage.block == 0:
            return None
        if not {stage.index - 1, stage.index} <= self.val_top1.keys():
            raise LayerwiseError(
                f"train.min_gain needs the validation top-1 of blocks {stage.block - 1} and {stage.block}, which "
                f"metrics.jsonl lacks; the trained weights are in {self.checkpoints}"
            )
        before, after = self.val_top1[stage.index - 1], self.val_top1[stage.index]
        if after - before >= min_gain:
            return None
        self.stopped = {
            "min_gain": min_gain,
            "blocks_delivered": stage.block,
            "reason": f"block {stage.block}'s head reached validation top-1 {after:.2f}, {after - before:+.2f} points "
            f"over block {stage.block - 1}'s {before:.2f}, less than train.min_gain={min_gain:g}: "
            f"the run delivers blocks 0-{stage.block - 1} and their heads",
        }
        return self.stopped

    def trained(self, stages: list[Stage]) -> list[Stage]:
        """The stages of the blocks the run delivers."""
        return stages[: self.stopped["blocks_delivered"] + 1] if self.stopped else stages

    def delivered(self, J: int) -> int:
        return J if self.stopped is None else self.stopped["blocks_delivered"]

    def amend(self, summary: dict[str, Any], net: StagedNet) -> None:
        """A stopped run's summary: the delivered network ends a block before the last one trained."""
        if self.stopped is not None:
            delivered = self.stopped["blocks_delivered"]
            summary["final"] = final_scores(summary["blocks"][delivered - 1])
            summary["params_final"] = count(net.blocks[:delivered]) + count(net.heads[delivered - 1])
            summary["adaptive_depth"] = self.stopped

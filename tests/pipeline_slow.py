"""Run by torchrun in test_pipeline.py: `layerwise ...` (its argv), where rank 0's training steps each take 0.2 s
longer, so that the processes after it wait for every batch: with train.replay they train on replays meanwhile."""

import sys
import time

from layerwise import cli
from layerwise.train import loop

if __name__ == "__main__":
    import os

    if os.environ.get("RANK") == "0":
        real = loop.StageTraining.step

        def slow(self, *args, **kwargs):
            time.sleep(0.2)
            return real(self, *args, **kwargs)

        loop.StageTraining.step = slow
    sys.exit(cli.main(sys.argv[1:]))

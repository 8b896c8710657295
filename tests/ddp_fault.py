"""Run by torchrun in test_distributed.py: `layerwise ...` (its argv), where on the job's first attempt (torchrun's
restart 0) rank 1 raises a LayerwiseError at its FAIL_AT_STEP-th training step, as a failing disk or a broken
batch would. Later attempts (torchrun --max-restarts) train normally."""

import os
import sys

from layerwise import cli
from layerwise.errors import LayerwiseError
from layerwise.train import loop


def fail_at(step_number: int) -> None:
    real = loop.StageTraining.step
    steps = [0]

    def step(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == step_number:
            raise LayerwiseError(f"rank 1 failed on purpose at step {step_number}")
        return real(self, *args, **kwargs)

    loop.StageTraining.step = step


if __name__ == "__main__":
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        fail_at(int(os.environ["FAIL_AT_STEP"]))
    sys.exit(cli.main(sys.argv[1:]))

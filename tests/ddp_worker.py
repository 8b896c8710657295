"""Run by torchrun in test_distributed.py: train through the library's Run, then save this process's own weights
and buffers (to RUN/rank{r}.pt), so the test can compare what every process ended with."""

import sys

import torch

from layerwise.config import parse_assignment
from layerwise.device import precision_for
from layerwise.distributed import from_env, process_group
from layerwise.presets import resolve_config
from layerwise.train.run import Run


def main(out: str, data: str, settings: list[str]) -> None:
    cfg = resolve_config("demo", None, [parse_assignment(a) for a in settings])
    where = from_env()
    device = torch.device("cpu")
    with process_group(where, device):
        run = Run.open(cfg, out, data, False, where, precision_for(device, cfg.train.precision))
        try:
            run.train()
        finally:
            run.close()
        torch.save(run.net.state_dict(), f"{out}/rank{where.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

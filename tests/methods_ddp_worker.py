"""Run by torchrun in test_methods.py: one training step of a method's decoupled ResNet-8 under DDP, each process
on its half of a fixed batch of 8 images; rank 0 saves the parameters after the step to OUT."""

import sys

import torch

from layerwise.device import precision_for
from layerwise.distributed import from_env, process_group
from layerwise.stages import plan_stages
from layerwise.train.loop import StageTraining


def main(out: str, head: str) -> None:
    from test_methods import batch_of_eight, small  # the test's own network and batch

    where = from_env()
    cpu = torch.device("cpu")
    with process_group(where, cpu):
        torch.manual_seed(0)
        cfg = small(head)
        from layerwise.models import build_model

        net = build_model(cfg.model, 4)
        training = StageTraining(
            net, plan_stages(net.J, "decoupled")[0], cfg, precision_for(cpu, "fp32"), where.replicas
        )
        training.start_epoch(0, 0, 1)
        x, y = batch_of_eight()
        half = slice(4 * where.rank, 4 * where.rank + 4)
        training.step(x[half], y[half])
        if where.rank == 0:
            torch.save({k: v for k, v in net.named_parameters()}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

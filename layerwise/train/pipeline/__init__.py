"""Pipelined decoupled training (`--mode decoupled --placement pipeline`): P processes, each holding a group of
consecutive blocks with their heads and optimizers.

Process 0 reads the batches; every process trains its blocks on what it receives, and sends the detached output
of its last block with the labels to the next process before its own backward pass, so activations and labels
flow forward only and no process waits for another's update. With every block trained on the output of the block
before it, for the same batch, taken before that block's update, the result is single-process decoupled training
(train/stage.py's `decoupled`), computed in P places at once.

The processes talk by torch.distributed point-to-point (gloo on the CPU, NCCL between GPUs) in a process group of
their own. Each message is a tensor whose shape and dtype travel ahead of it (`Pipe`), so a short last batch needs
nothing special. Epoch figures and evaluation counts are all-reduced with each head's row filled by the process
that holds it; rank 0 gathers every block's weights and optimizer state after each epoch and alone writes the run.

pipe.py moves the tensors, placement.py decides which blocks each process holds, replay.py keeps the batches a
process may train on again, and runner.py is the StageRunner with its own epoch loop.
"""

from layerwise.train.pipeline.runner import PipelineRunner

__all__ = ["PipelineRunner"]

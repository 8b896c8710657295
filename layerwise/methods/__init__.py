"""Local-learning methods, each in its own file with its auxiliary network and its local loss: PredSim (predsim.py)
and InfoPro (infopro.py). A method registers its heads (layerwise.models.heads.register_head) and their losses
(layerwise.losses.register_losses) under its model.head kinds; the loop and the runners never change.
docs/methods.md compares them with their released code."""

from layerwise.methods import infopro, predsim

__all__ = ["infopro", "predsim"]

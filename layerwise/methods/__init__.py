"""Local-learning methods, each in its own file with its auxiliary network and its local loss: PredSim (predsim.py),
InfoPro (infopro.py) and AugLocal (auglocal.py, whose loss is plain cross-entropy). A method registers its heads
(layerwise.models.heads.register_head) and their losses (layerwise.losses.register_losses) under its model.head
kinds; the loop and the runners never change. docs/methods.md compares them with their released code."""

from layerwise.methods import auglocal, infopro, predsim

__all__ = ["auglocal", "infopro", "predsim"]

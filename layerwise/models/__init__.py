"""Models: invertible downsampling, blocks, auxiliary heads and the staged network."""

from layerwise.models.blocks import Block
from layerwise.models.downsample import SpaceToDepth
from layerwise.models.heads import AuxClassifier, VGGClassifier
from layerwise.models.staged import StagedNet, build_model

__all__ = ["AuxClassifier", "Block", "SpaceToDepth", "StagedNet", "VGGClassifier", "build_model"]

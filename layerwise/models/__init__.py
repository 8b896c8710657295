"""Models: invertible downsampling, blocks, auxiliary heads, the staged network and the architecture registry."""

from layerwise import methods  # noqa: F401  (register the local-learning methods' heads and losses)
from layerwise.models import custom, paper, resnet, timm_models  # noqa: F401  (register the architectures)
from layerwise.models.blocks import Block
from layerwise.models.downsample import SpaceToDepth
from layerwise.models.heads import (
    AuxClassifier,
    DGLHead,
    HeadLayout,
    HeadSpec,
    InfoProHead,
    LinearHead,
    VGGClassifier,
    register_head,
)
from layerwise.models.registry import architectures, build_model, register_model
from layerwise.models.staged import StagedNet

__all__ = [
    "AuxClassifier",
    "Block",
    "DGLHead",
    "HeadLayout",
    "HeadSpec",
    "InfoProHead",
    "LinearHead",
    "SpaceToDepth",
    "StagedNet",
    "VGGClassifier",
    "architectures",
    "build_model",
    "register_head",
    "register_model",
]

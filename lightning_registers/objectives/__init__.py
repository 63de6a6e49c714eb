"""One LightningModule per objective, and what trains them at scale."""

from .base import ObjectiveModule
from .checkpoint import export_backbone, load_objective
from .clip import ClipModule
from .dino import DinoModule
from .fsdp import FSDP2Strategy
from .supervised import SupervisedModule

__all__ = [
    "ClipModule",
    "DinoModule",
    "FSDP2Strategy",
    "ObjectiveModule",
    "SupervisedModule",
    "export_backbone",
    "load_objective",
]

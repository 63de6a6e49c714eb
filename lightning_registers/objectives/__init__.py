"""One LightningModule per objective."""

from .base import ObjectiveModule
from .clip import ClipModule
from .dino import DinoModule
from .supervised import SupervisedModule

__all__ = ["ClipModule", "DinoModule", "ObjectiveModule", "SupervisedModule"]

"""One LightningModule per objective."""

from .base import ObjectiveModule
from .clip import ClipModule
from .supervised import SupervisedModule

__all__ = ["ClipModule", "ObjectiveModule", "SupervisedModule"]

"""One LightningModule per objective."""

from .base import ObjectiveModule
from .supervised import SupervisedModule

__all__ = ["ObjectiveModule", "SupervisedModule"]

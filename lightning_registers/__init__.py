"""Train and study Vision Transformers with register tokens with PyTorch Lightning."""

__version__ = "0.1.0"

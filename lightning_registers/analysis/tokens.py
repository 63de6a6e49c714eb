"""Token features of a backbone over many images, batch by batch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ..measures.norms import token_norms


def batches(images: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size].to(device)


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def patch_norms_by_layer(
    backbone: nn.Module, images: torch.Tensor, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """Patch-token norms (N, P) after every block (``blockNN``, the residual stream) and of the
    normalized output (``output``)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in batches(images, batch_size, device_of(backbone)):
        for layer, kinds in token_norms(backbone, batch, range(backbone.depth)).items():
            parts.setdefault(layer, []).append(kinds["patches"].cpu())
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


@torch.no_grad()
def output_tokens(
    backbone: nn.Module, images: torch.Tensor, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized output [CLS] (N, D) and patch tokens (N, P, D)."""
    cls, patches = [], []
    for batch in batches(images, batch_size, device_of(backbone)):
        features = backbone(batch, return_features=True)
        cls.append(features["x_norm_clstoken"].float().cpu())
        patches.append(features["x_norm_patchtokens"].float().cpu())
    return torch.cat(cls), torch.cat(patches)

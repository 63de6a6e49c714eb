"""Attention of [CLS] and of each register over the patches (paper Fig. 9, 14)."""

from __future__ import annotations

import torch
from torch import nn

from .figures import display_images, grid, overlay


def query_names(num_registers: int) -> list[str]:
    """Names of the prefix tokens as attention queries: ``cls``, ``reg0``, ``reg1``, ..."""
    return ["cls"] + [f"reg{i}" for i in range(num_registers)]


def prefix_attention(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-block attention of [CLS] and each register over the patch tokens, reshaped to the
    patch grid: (B, heads, 1 + R, h, w). Runs the backbone's own forward (FSDP2-safe)."""
    attn = backbone.blocks[-1].attn
    attn.keep_attention = True
    try:
        backbone(images)
        attention = attn.attention.float()
    finally:
        attn.keep_attention, attn.attention = False, None
    r = backbone.num_prefix_tokens
    grid_size = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
    return attention[:, :, :r, r:].reshape(*attention.shape[:2], r, *grid_size)


def attention_grids(
    attention: torch.Tensor, queries: list[str], images: torch.Tensor
) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Grids of ``prefix_attention`` maps over their images, by name: ``mean`` (the image, then
    the head-mean map of each query) and ``heads_QUERY`` (a column per head); with their column
    titles."""
    images = images[: len(attention)]
    mean = attention.mean(dim=1)
    columns = [display_images(images)] + [overlay(images, mean[:, q]) for q in range(len(queries))]
    out = {"mean": (grid(columns), ["image", *queries])}
    heads = range(attention.shape[1])
    for q, query in enumerate(queries):
        columns = [overlay(images, attention[:, h, q]) for h in heads]
        out[f"heads_{query}"] = (grid(columns), [f"head {h}" for h in heads])
    return out

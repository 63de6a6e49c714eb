"""Attention of [CLS] and of each register over the patches (paper Fig. 9, 14), and how much of
it lands on high-norm tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from .figures import display_images, grid, overlay


def query_names(num_registers: int) -> list[str]:
    """Names of the prefix tokens as attention queries: ``cls``, ``reg0``, ``reg1``, ..."""
    return ["cls"] + [f"reg{i}" for i in range(num_registers)]


Result = TypeVar("Result")


def with_prefix_attention(
    backbone: nn.Module, images: torch.Tensor, forward: Callable[[], Result]
) -> tuple[Result, torch.Tensor]:
    """Run ``forward`` (a forward of ``backbone`` on ``images``) with the last block keeping its
    attention weights: its result and the ``prefix_attention`` of that forward. One forward
    serves any other measure taken in it (hooks), and it is the backbone's own (FSDP2-safe)."""
    with backbone.capture_attention() as captured:
        result = forward()
    attention = captured[backbone.depth - 1].float()
    r = backbone.num_prefix_tokens
    grid_size = backbone.patch_grid(images)
    return result, attention[:, :, :r, r:].reshape(*attention.shape[:2], r, *grid_size)


def prefix_attention(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Last-block attention of [CLS] and each register over the patch tokens, reshaped to the
    patch grid: (B, heads, 1 + R, h, w)."""
    return with_prefix_attention(backbone, images, lambda: backbone(images))[1]


def attention_on_high_norm(attention: torch.Tensor, high_norm: torch.Tensor) -> dict:
    """Share of each query's patch attention (head mean of a ``prefix_attention``) that lands
    on high-norm patches (``high_norm``, (N, P)), against the share of patches that are
    high-norm."""
    mean = attention.float().mean(dim=1).flatten(2)  # (N, queries, P)
    mean = mean / mean.sum(-1, keepdim=True)
    on_high = (mean * high_norm[:, None].float()).sum(-1).mean(0)
    return {
        "share_of_patches": high_norm.float().mean().item(),
        "cls": on_high[0].item(),
        "registers": on_high[1:].tolist(),
    }


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

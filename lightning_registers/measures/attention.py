"""Attention of [CLS] and of each register over the patches (paper Fig. 9, 14), and how much of
it lands on high-norm tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from .figures import ColourScale, display_images, grid, labelled_grid


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
    attention: torch.Tensor, queries: list[str], images: torch.Tensor, labelled: bool = False
) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Grids of ``prefix_attention`` maps beside their images, by name: ``mean`` (the image,
    then the head-mean map of each query) and ``heads_QUERY`` (the image, then a column per
    head); with their column titles.

    A map shows each patch's share of the query's attention over the patches times the number
    of patches (1: uniform attention), every map of a grid on one colour scale from 0 to the
    grid's largest value (at least 2), so that maps of one grid compare and a flat map stays
    dark. ``labelled`` writes the titles above the columns and the colour bar beside the grid
    (``labelled_grid``); else the grid alone (``grid``)."""
    images = images[: len(attention)]
    shown = display_images(images)
    maps = attention.float() / attention.float().sum(dim=(-2, -1), keepdim=True)
    maps = maps * attention.shape[-2] * attention.shape[-1]
    heads = range(attention.shape[1])
    panels = {"mean": (maps.mean(dim=1), queries)}
    for q, query in enumerate(queries):
        panels[f"heads_{query}"] = (maps[:, :, q], [f"head {h}" for h in heads])
    out = {}
    for name, (panel, titles) in panels.items():
        top = max(2.0, panel.max().item())
        scale = ColourScale(0.0, top, "attention\n× uniform", ticks=(1.0,))
        columns = [
            shown,
            *(scale.colour(panel[:, c], shown.shape[-2:]) for c in range(len(titles))),
        ]
        titles = ["image", *titles]
        out[name] = (labelled_grid(columns, titles, scale) if labelled else grid(columns), titles)
    return out

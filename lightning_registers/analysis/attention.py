"""Where [CLS] and each register look: last-block attention maps over the images (paper Fig. 9
and 14), and how much of [CLS]'s attention lands on high-norm tokens."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..measures.attention import (  # noqa: F401 (attention_on_high_norm: analysis API too)
    attention_grids,
    attention_on_high_norm,
    prefix_attention,
    query_names,
)
from ..measures.figures import draw_grid, plt, save_grid_png
from .figure_style import save
from .tokens import batches, device_of


@torch.no_grad()
def attention_maps(backbone: nn.Module, images: torch.Tensor, batch_size: int = 32) -> dict:
    """``attention`` (N, heads, 1 + R, h, w): last-block attention of [CLS] and each register
    over the patches, and the ``queries`` names."""
    maps = [
        prefix_attention(backbone, batch).cpu()
        for batch in batches(images, batch_size, device_of(backbone))
    ]
    return {"attention": torch.cat(maps), "queries": query_names(backbone.num_registers)}


def draw_attention_side_by_side(results: dict[str, tuple[dict, torch.Tensor]]):
    """The head-mean maps of [CLS] and every register, a panel per model (``results``: name ->
    (``attention_maps`` result, its images)), the same images in every panel's rows. Returns
    the figure."""
    panels = {
        name: attention_grids(maps["attention"], maps["queries"], images)["mean"]
        for name, (maps, images) in results.items()
    }
    widths = [image.shape[-1] for image, _ in panels.values()]
    height = max(image.shape[-2] for image, _ in panels.values())
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(sum(widths) / 80 + 0.5 * len(panels), height / 80 + 0.8),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
        layout="constrained",
    )
    for ax, (name, (image, titles)) in zip(axes[0], panels.items(), strict=True):
        draw_grid(ax, image, titles, f"{name}: last-block attention, head mean")
    fig.supxlabel("a row per image; brighter: more attention", fontsize=9)
    return fig


def plot_attention_side_by_side(results: dict[str, tuple[dict, torch.Tensor]], path: Path) -> Path:
    """``draw_attention_side_by_side`` written to ``path``."""
    return save(draw_attention_side_by_side(results), path)


def plot_attention(results: dict[str, dict], images: torch.Tensor, out_dir: Path) -> list[Path]:
    """Per model, the head-mean maps of every query and the per-head maps of [CLS]."""
    paths = []
    for name, result in results.items():
        grids = attention_grids(result["attention"], result["queries"], images)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        for suffix in ("mean", "heads_cls"):
            image, titles = grids[suffix]
            title = f"{name}: last-block attention ({suffix.replace('_', ' ')})"
            paths.append(
                save_grid_png(image, titles, out_dir / f"attention_{suffix}_{stem}.png", title)
            )
    return paths

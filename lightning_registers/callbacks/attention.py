"""Attention maps of [CLS] and of each register over the patches in TensorBoard (paper Fig. 9,
14)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..measures.attention import attention_grids, prefix_attention, query_names
from ..measures.figures import save_grid_png
from .probe import ProbeCallback


class AttentionMapMonitor(ProbeCallback):
    """Last-block attention of [CLS] and of each register over the patches, drawn as heat maps
    beside the probe images (``measures.attention.attention_grids``: in multiples of uniform
    attention, one colour scale per grid, its colour bar beside it, each column titled).

    Logged per watched backbone NAME: ``attention/NAME/mean`` (a row per image: the image, then
    the head-mean map of [CLS] and of each register) and ``attention/NAME/heads_QUERY`` for
    QUERY in ``cls``, ``reg0``, ... (a row per image: the image, then a column per head).

    Args:
        every_n_steps: cadence in optimizer steps.
        n_images: probe images drawn (the probe batch).
        save_png: also write the figures as PNG files under ``<run dir>/figures/``.
    """

    def __init__(self, every_n_steps: int = 500, n_images: int = 4, save_png: bool = False):
        super().__init__(every_n_steps, n_images, save_png)
        self.n_images = n_images

    def measure(self, backbone: nn.Module, images: torch.Tensor) -> dict:
        attention = prefix_attention(backbone, images[: self.n_images])
        return {"attention": attention, "queries": query_names(backbone.num_registers)}

    def grids(self, result: dict, images: torch.Tensor) -> dict[str, tuple[torch.Tensor, list]]:
        """The labelled images to draw, by tag suffix: (image, column titles)."""
        return attention_grids(result["attention"], result["queries"], images, labelled=True)

    def report(self, writer, name: str, result: dict, images: torch.Tensor, step: int) -> None:
        for suffix, (image, _) in self.grids(result, images).items():
            writer.add_image(f"attention/{name}/{suffix}", image, step)

    def save_figures(self, out_dir: str | Path, step: int | None = None) -> list[Path]:
        """Per backbone and grid: a PNG of the attention maps."""
        out_dir = Path(out_dir)
        paths = []
        for name, result in self.results.items():
            step = result["step"] if step is None else step
            for suffix, (image, _) in self.grids(result, self.probe).items():
                path = out_dir / f"attention_{suffix}_{name}_step{step:07d}.png"
                title = f"{name}, step {step}: last-block attention ({suffix})"
                paths.append(save_grid_png(image, [], path, title))
        return paths

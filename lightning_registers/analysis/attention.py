"""Where [CLS] and each register look: last-block attention maps over the images (paper Fig. 9
and 14), and how much of [CLS]'s attention lands on high-norm tokens."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch
from torch import nn

from ..measures.attention import attention_grids, attention_on_high_norm, query_names
from ..measures.figures import plt
from .figure_style import save
from .tokens import Images, Observation, batches, device_of, observe


def last_block_attention(backbone: nn.Module, seen: Observation) -> torch.Tensor:
    """Last-block attention of [CLS] and each register over the patches in the forward that
    ``seen`` observed, on the patch grid: (B, heads, 1 + R, h, w). Computed from the block's
    query-key-value projection as the block computes explicit weights (``capture_attention``),
    so that the forward itself stays the model's fused one."""
    attn = backbone.blocks[-1].attn
    b, t, _ = seen.qkv.shape
    qkv = seen.qkv.reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    r = backbone.num_prefix_tokens
    return weights[:, :, :r, r:].reshape(b, attn.num_heads, r, *seen.grid)


@torch.no_grad()
def attention_maps(backbone: nn.Module, images: Images, batch_size: int = 32) -> dict:
    """``attention`` (N, heads, 1 + R, h, w): last-block attention of [CLS] and each register
    over the patches, and the ``queries`` names."""
    maps = [
        last_block_attention(backbone, observe(backbone, batch)).cpu()
        for batch in batches(images, batch_size, device_of(backbone))
    ]
    return {"attention": torch.cat(maps), "queries": query_names(backbone.num_registers)}


class AttentionKeeper:
    """What the analysis keeps of the attention maps of many images, given batch by batch:
    each image's head mean (for ``attention_on_high_norm``) and every head of the first
    ``shown`` images (for the figures)."""

    def __init__(self, num_registers: int, shown: int) -> None:
        self.queries = query_names(num_registers)
        self.shown = shown
        self.head_means: list[torch.Tensor] = []
        self.first: list[torch.Tensor] = []
        self.kept = 0

    def add(self, maps: torch.Tensor) -> None:
        """``maps`` (B, heads, 1 + R, h, w) of the next images."""
        maps = maps.cpu()
        self.head_means.append(maps.mean(dim=1))
        if self.kept < self.shown:  # a copy: not a view holding the batch's every weight
            self.first.append(maps[: self.shown - self.kept].clone())
            self.kept += len(self.first[-1])

    def result(self, high_norm: torch.Tensor) -> tuple[dict, dict]:
        """The maps of the first images as ``attention_maps`` gives them, and
        ``attention_on_high_norm`` of every image (``high_norm`` flags, (N, P))."""
        head_means = torch.cat(self.head_means)[:, None]  # one "head": the mean of all
        maps = {"attention": torch.cat(self.first), "queries": self.queries}
        return maps, attention_on_high_norm(head_means, high_norm)


def _white_gaps(image: torch.Tensor) -> list[int]:
    """The middle column of each run of at least two white columns inside ``image``
    (3, H, W): where its grid's columns meet."""
    white = (image == 1).all(dim=0).all(dim=0).tolist()
    gaps, start = [], None
    for column, is_white in enumerate([*white, False]):
        if is_white and start is None:
            start = column
        elif not is_white and start is not None:
            if column - start >= 2 and 0 < start and column < len(white):
                gaps.append((start + column) // 2)
            start = None
    return gaps


def show_in_bands(ax, image: torch.Tensor) -> None:
    """``ax.imshow`` of ``image`` (3, H, W) as vertical bands cut in its white gaps.
    Matplotlib resamples an image in float RGBA at its size on the canvas (about a gigabyte
    for the grid of eight 224-pixel images); band by band it holds one band's worth. The bands
    meet on white, so the picture is the same (to a rounding of the resampling)."""
    height, width = image.shape[-2:]
    pixels = image.permute(1, 2, 0).numpy()
    cuts = [0, *_white_gaps(image), width]
    for left, right in itertools.pairwise(cuts):
        extent = (left - 0.5, right - 0.5, height - 0.5, -0.5)
        ax.imshow(pixels[:, left:right], extent=extent)
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)


def draw_grids(panels: dict[str, torch.Tensor]):
    """``labelled_grid`` images (column titles and colour bar drawn in), side by side, each
    titled by its key. Returns the figure."""
    widths = [image.shape[-1] for image in panels.values()]
    height = max(image.shape[-2] for image in panels.values())
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(sum(widths) / 80 + 0.2 * len(panels), height / 80 + 0.5),
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
        layout="constrained",
    )
    for ax, (title, image) in zip(axes[0], panels.items(), strict=True):
        show_in_bands(ax, image)
        ax.set_axis_off()
        ax.set_title(title, fontsize=10)
    fig.supxlabel("a row per image", fontsize=9)
    return fig


def draw_attention_side_by_side(results: dict[str, tuple[dict, torch.Tensor]]):
    """The head-mean maps of [CLS] and every register, a panel per model (``results``: name ->
    (``attention_maps`` result, its images)), the same images in every panel's rows. Returns
    the figure."""
    return draw_grids(
        {
            f"{name}: last-block attention, head mean": attention_grids(
                maps["attention"], maps["queries"], images, labelled=True
            )["mean"][0]
            for name, (maps, images) in results.items()
        }
    )


def plot_attention_side_by_side(results: dict[str, tuple[dict, torch.Tensor]], path: Path) -> Path:
    """``draw_attention_side_by_side`` written to ``path``."""
    return save(draw_attention_side_by_side(results), path)


def plot_attention(results: dict[str, dict], images: torch.Tensor, out_dir: Path) -> list[Path]:
    """Per model, the head-mean maps of every query and the per-head maps of [CLS]."""
    paths = []
    for name, result in results.items():
        grids = attention_grids(result["attention"], result["queries"], images, labelled=True)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        for suffix in ("mean", "heads_cls"):
            title = f"{name}: last-block attention ({suffix.replace('_', ' ')})"
            figure = draw_grids({title: grids[suffix][0]})
            paths.append(save(figure, out_dir / f"attention_{suffix}_{stem}.png"))
    return paths

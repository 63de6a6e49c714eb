"""Drawing for the monitors and the analysis: fast heat-map grids for TensorBoard (a colour-map
lookup, no figure rendering) and matplotlib figures for PNG files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DISPLAY_SIDE = 96


def display_images(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) scaled to [0, 1] per image (undoes any mean/std normalization up to
    an affine map) and enlarged to at least ``DISPLAY_SIDE`` pixels."""
    images = images.detach().float().cpu()
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low).clamp_min(1e-8)
    return F.interpolate(images, scale_factor=_scale(images.shape[-2:]), mode="nearest")


def _scale(size: Sequence[int]) -> int:
    return max(1, math.ceil(DISPLAY_SIDE / min(size)))


def heatmaps(
    maps: torch.Tensor,
    size: Sequence[int],
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "inferno",
) -> torch.Tensor:
    """Coloured heat maps (B, 3, H, W) of ``maps`` (B, h, w), upsampled (nearest) to ``size``;
    one colour scale (``vmin``..``vmax``, default the maps' range) for all."""
    maps = maps.detach().float().cpu()
    vmin = maps.min().item() if vmin is None else vmin
    vmax = maps.max().item() if vmax is None else vmax
    scaled = ((maps - vmin) / max(vmax - vmin, 1e-8)).clamp(0, 1)
    scaled = F.interpolate(scaled[:, None], size=tuple(size), mode="nearest")[:, 0]
    rgba = matplotlib.colormaps[cmap](scaled.numpy())
    return torch.from_numpy(rgba[..., :3]).permute(0, 3, 1, 2).float()


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Each map (B, h, w), scaled to its own range, blended over its display image."""
    shown = display_images(images)
    colored = torch.stack([heatmaps(m[None], shown.shape[-2:])[0] for m in maps])
    return (1 - alpha) * shown + alpha * colored


def grid(columns: Sequence[torch.Tensor]) -> torch.Tensor:
    """One image (3, H, W) with a row per probe image and the given columns (each B, 3, h, w)."""
    rows = torch.stack(list(columns), dim=1).flatten(0, 1)
    return make_grid(rows, nrow=len(columns), padding=2, pad_value=1.0)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG (creating its folder) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_grid(ax, image: torch.Tensor, column_titles: Sequence[str], title: str) -> None:
    """A grid from ``grid`` on ``ax``, each column titled below."""
    width = image.shape[-1]
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.set_xticks([(i + 0.5) * width / len(column_titles) for i in range(len(column_titles))])
    ax.set_xticklabels(column_titles, fontsize=8)
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)


def save_grid_png(
    image: torch.Tensor, column_titles: Sequence[str], path: Path, title: str
) -> Path:
    """A grid from ``grid`` as a PNG figure with column titles."""
    height, width = image.shape[-2:]
    fig, ax = plt.subplots(figsize=(max(4.0, width / 80), max(3.0, height / 80 + 0.6)))
    draw_grid(ax, image, column_titles, title)
    return save_figure(fig, path)


def histogram_range(values) -> tuple[float, float]:
    """The range to bin ``values`` over: normalized outputs can all have the same norm, so the
    bins get a finite width."""
    low, high = float(values.min()), float(values.max())
    return low, max(high, low + 1e-3 * max(1.0, low))


def save_norm_histograms_png(
    patch_norms: dict[str, torch.Tensor], threshold: float, path: Path, title: str
) -> Path:
    """Histograms of patch-token norms, one panel per layer, log count axis (paper Fig. 3/4)."""
    layers = list(patch_norms)
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        values = patch_norms[layer].flatten().double().cpu().numpy()
        ax.hist(values, bins=60, range=histogram_range(values), log=True, color="tab:blue")
        if threshold <= values.max() * 1.5:
            ax.axvline(threshold, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(layer, fontsize=9)
        ax.set_xlabel("token norm", fontsize=8)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_share_by_layer_png(shares: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """High-norm share of patch tokens against layer, one line per rule (paper Fig. 5b)."""
    layers = list(next(iter(shares.values())))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(layers) + 2), 3.0))
    for rule, by_layer in shares.items():
        ax.plot(
            range(len(layers)), [100 * by_layer[layer] for layer in layers], marker="o", label=rule
        )
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(layers, rotation=60, fontsize=7)
    ax.set_ylabel("high-norm patch tokens (%)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)

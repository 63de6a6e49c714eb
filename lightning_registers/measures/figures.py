"""Drawing for the monitors and the analysis: fast heat-map grids for TensorBoard (a colour-map
lookup, no figure rendering) and matplotlib figures for PNG files."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DISPLAY_SIDE = 96
PADDING = 2
"""Pixels between the cells of a ``grid``."""
FONT_SIZE = 11
BAR = 10
"""Width of a colour bar in pixels (with a gap as wide before it)."""


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


def grid(columns: Sequence[torch.Tensor]) -> torch.Tensor:
    """One image (3, H, W) with a row per probe image and the given columns (each B, 3, h, w)."""
    rows = torch.stack(list(columns), dim=1).flatten(0, 1)
    return make_grid(rows, nrow=len(columns), padding=PADDING, pad_value=1.0)


@dataclass(frozen=True)
class ColourScale:
    """One colour scale for maps drawn together: values ``vmin``..``vmax`` through ``cmap``
    (beyond them, the end colours); its colour bar is titled ``label`` and marks ``ticks``
    besides both ends."""

    vmin: float
    vmax: float
    label: str
    ticks: tuple[float, ...] = ()
    cmap: str = "inferno"

    def colour(self, maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """``heatmaps`` of ``maps`` (B, h, w) on this scale, upsampled to ``size``."""
        return heatmaps(maps, size, self.vmin, self.vmax, self.cmap)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans, the font matplotlib ships: legible at small sizes, with every symbol."""
    return ImageFont.truetype(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf", size)


def _fitted(text: str, width: float):
    """The largest font, down to 7 px, in which every line of ``text`` fits ``width``."""
    for size in range(FONT_SIZE, 6, -1):
        font = _font(size)
        if max(font.getlength(line) for line in text.split("\n")) <= width:
            return font
    return font


def _to_image(image: torch.Tensor) -> Image.Image:
    pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


def labelled_grid(
    columns: Sequence[torch.Tensor], titles: Sequence[str], scale: ColourScale | None = None
) -> torch.Tensor:
    """A ``grid`` of ``columns`` (3, H, W) with each column's title (lines split at ``\\n``)
    written above it and, for maps drawn on ``scale``, its colour bar on the right."""
    body = grid(columns)
    height, width = body.shape[-2:]
    line = FONT_SIZE + 2
    texts = [*titles, *([scale.label] if scale else [])]
    header = line * max(text.count("\n") + 1 for text in texts) + 4
    bar, footer = (_colour_bar_width(scale), FONT_SIZE // 2) if scale else (0, 0)
    canvas = Image.new("RGB", (width + bar, height + header + footer), "white")
    canvas.paste(_to_image(body), (0, header))
    draw = ImageDraw.Draw(canvas)
    cell = (width - PADDING) / len(columns)
    for i, title in enumerate(titles):
        font = _fitted(title, cell - PADDING)
        centre = PADDING / 2 + (i + 0.5) * cell
        for j, text in enumerate(title.split("\n")):
            draw.text((centre, 2 + j * line), text, fill="black", font=font, anchor="mt")
    if scale:
        _draw_colour_bar(canvas, scale, width, header, height, line)
    pixels = torch.from_numpy(np.asarray(canvas).copy())
    return pixels.permute(2, 0, 1).float() / 255


def _tick_label(value: float) -> str:
    return f"{value:.3g}"


def _tick_values(scale: ColourScale) -> list[float]:
    inside = [t for t in scale.ticks if scale.vmin < t < scale.vmax]
    return [scale.vmin, scale.vmax, *inside]


def _colour_bar_width(scale: ColourScale) -> int:
    font = _font(FONT_SIZE)
    labels = [_tick_label(t) for t in _tick_values(scale)] + scale.label.split("\n")
    return 2 * BAR + 4 + math.ceil(max(font.getlength(t) for t in labels)) + 4


def _draw_colour_bar(
    canvas: Image.Image, scale: ColourScale, left: int, top: int, height: int, line: int
) -> None:
    """The bar of ``scale`` from ``top`` over the grid's ``height`` (high values up), its ticks
    labelled on its right, its label above it; ticks that would overlap a drawn one are left
    out (the ends first)."""
    font = _font(FONT_SIZE)
    x0, y0, y1 = left + BAR, top + PADDING, top + height - PADDING
    values = np.linspace(1, 0, y1 - y0)[:, None].repeat(BAR, axis=1)
    colours = (matplotlib.colormaps[scale.cmap](values)[..., :3] * 255).round().astype(np.uint8)
    canvas.paste(Image.fromarray(colours), (x0, y0))
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(scale.label.split("\n")):
        draw.text((x0, 2 + j * line), text, fill="black", font=font)
    placed: list[float] = []
    for value in _tick_values(scale):
        fraction = (value - scale.vmin) / max(scale.vmax - scale.vmin, 1e-12)
        y = y1 - 1 - fraction * (y1 - y0 - 1)
        if any(abs(y - other) < FONT_SIZE for other in placed):
            continue
        placed.append(y)
        draw.line((x0 + BAR, y, x0 + BAR + 3, y), fill="black")
        draw.text((x0 + BAR + 5, y), _tick_label(value), fill="black", font=font, anchor="lm")


def norm_map_grid(
    images: torch.Tensor,
    patch_norms: dict[str, torch.Tensor],
    grid_size: Sequence[int],
    factor: float = 3.0,
) -> torch.Tensor:
    """``images`` (N, 3, H, W) beside the patch-norm maps of each layer of ``patch_norms``
    (layer -> norms (B, P) over the probe batch, whose first N rows are drawn), each column
    labelled with its layer and the min, median and max norm over the batch.

    A map shows norm / median of its layer (the median of the relative rule), every map on one
    colour scale from 0 to the largest ratio drawn, at least ``factor`` (the rule's cut, marked
    on the colour bar with the median's 1): a layer whose norms all lie near its median is one
    even colour, however small its spread in absolute terms."""
    shown = display_images(images)
    count = len(images)
    ratios, titles = [], ["image"]
    for layer, norms in patch_norms.items():
        norms = norms.detach().float().cpu()
        median = norms.median()
        ratios.append((norms[:count] / median.clamp_min(1e-12)).reshape(count, *grid_size))
        titles.append(f"{layer}\nmin {norms.min():.4g}\nmedian {median:.4g}\nmax {norms.max():.4g}")
    top = max(factor, *(ratio.max().item() for ratio in ratios))
    scale = ColourScale(0.0, top, "norm /\nmedian", ticks=(1.0, factor))
    columns = [shown, *(scale.colour(ratio, shown.shape[-2:]) for ratio in ratios)]
    return labelled_grid(columns, titles, scale)


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

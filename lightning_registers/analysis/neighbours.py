"""How redundant the patches of high-norm tokens are: cosine similarity of each patch embedding
(the patch-embedding layer's output, before position embeddings) to its 4 neighbours, for
high-norm against normal tokens (paper Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..measures.figures import plt, save_figure
from ..measures.placement import neighbour_cosine
from .tokens import batches, device_of


@torch.no_grad()
def patch_embeddings(backbone: nn.Module, images: torch.Tensor, batch_size: int = 32):
    """The patch-embedding output (N, h, w, D), before position embeddings."""
    grid = backbone.patch_grid(images)
    out = [
        backbone.patch_embed(batch).float().cpu()
        for batch in batches(images, batch_size, device_of(backbone))
    ]
    return torch.cat(out).reshape(len(images), *grid, -1)


def neighbour_similarity(
    backbone: nn.Module, images: torch.Tensor, high_norm: torch.Tensor, batch_size: int = 32
) -> dict:
    """Neighbour similarity of every patch (``similarity``, (N, P)) and its mean over the
    high-norm tokens (``high_norm`` flags, (N, P)) and over the others."""
    similarity = neighbour_cosine(patch_embeddings(backbone, images, batch_size)).flatten(1)
    high = similarity[high_norm]
    normal = similarity[~high_norm]
    return {
        "similarity": similarity,
        "high_norm": high,
        "normal": normal,
        "mean_high_norm": high.mean().item() if len(high) else None,
        "mean_normal": normal.mean().item() if len(normal) else None,
    }


def plot_neighbour_similarity(results: dict[str, dict], path: Path) -> Path:
    """Per model, histograms of neighbour similarity for normal and high-norm tokens."""
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        bins = torch.linspace(-1, 1, 41).numpy()
        for key, colour in (("normal", "tab:blue"), ("high_norm", "tab:red")):
            values = result[key]
            if len(values):
                label = f"{key.replace('_', '-')} ({len(values)})"
                ax.hist(
                    values.numpy(), bins=bins, density=True, alpha=0.6, color=colour, label=label
                )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cosine similarity to the 4 neighbours", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("patch redundancy: high-norm vs normal tokens", fontsize=10)
    return save_figure(fig, path)

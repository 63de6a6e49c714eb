"""How redundant the patches of high-norm tokens are: cosine similarity of each patch embedding
(the patch-embedding layer's output, before position embeddings) to its 4 neighbours, for
high-norm against normal tokens (paper Fig. 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..measures.figures import plt
from ..measures.norms import OutlierRule
from ..measures.placement import neighbour_cosine
from .figure_style import legend_outside, note, rule_text, save
from .tokens import Images, batches, device_of


@torch.no_grad()
def patch_embeddings(backbone: nn.Module, images: Images, batch_size: int = 32) -> torch.Tensor:
    """The patch-embedding output (N, h, w, D), before position embeddings."""
    out = []
    for batch in batches(images, batch_size, device_of(backbone)):
        embedded = backbone.patch_embed(batch).float().cpu()
        out.append(embedded.reshape(len(batch), *backbone.patch_grid(batch), -1))
    return torch.cat(out)


def patch_similarity(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each patch embedding of ``images`` (one batch) to its 4
    neighbours, (B, P)."""
    return neighbour_cosine(patch_embeddings(backbone, images, len(images))).flatten(1)


def split_by_norm(similarity: torch.Tensor, high_norm: torch.Tensor) -> dict:
    """Neighbour similarity of every patch (``similarity``, (N, P)) and its mean over the
    high-norm tokens (``high_norm`` flags, (N, P)) and over the others."""
    high = similarity[high_norm]
    normal = similarity[~high_norm]
    return {
        "similarity": similarity,
        "high_norm": high,
        "normal": normal,
        "mean_high_norm": high.mean().item() if len(high) else None,
        "mean_normal": normal.mean().item() if len(normal) else None,
    }


def neighbour_similarity(
    backbone: nn.Module, images: Images, high_norm: torch.Tensor, batch_size: int = 32
) -> dict:
    """``split_by_norm`` of the neighbour similarity of every patch of ``images``."""
    similarity = [
        patch_similarity(backbone, batch)
        for batch in batches(images, batch_size, device_of(backbone))
    ]
    return split_by_norm(torch.cat(similarity), high_norm)


def draw_neighbour_similarity(results: dict[str, dict], rule: OutlierRule | None = None):
    """Per model, histograms (densities) of neighbour similarity for normal and high-norm tokens
    (by ``rule``, named in the title where given), "no high-norm tokens" written where a model
    has none. Returns the figure."""
    fig, axes = plt.subplots(
        1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False, layout="constrained"
    )
    bins = np.linspace(-1, 1, 41)
    kinds = {"normal": ("normal", "tab:blue"), "high_norm": ("high-norm", "tab:red")}
    for ax, (name, result) in zip(axes[0], results.items(), strict=True):
        missing = []
        for key, (label, colour) in kinds.items():
            values = result[key]
            if not len(values):
                missing.append(f"no {label} tokens")
                continue
            text = f"{label}: {len(values)} tokens, mean {values.mean().item():.3f}"
            ax.hist(values.numpy(), bins=bins, density=True, alpha=0.55, color=colour, label=text)
        if missing:
            note(ax, "\n".join(missing))
        ax.set_xlim(-1, 1)
        ax.set_xticks(np.linspace(-1, 1, 5))
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cosine similarity of a patch embedding to its 4 neighbours", fontsize=8)
        ax.set_ylabel("density (tokens per unit cosine)", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            legend_outside(ax, "below")
    split = f" (high-norm: output {rule_text(rule)})" if rule else ""
    fig.suptitle(f"patch redundancy: high-norm vs normal tokens{split}", fontsize=10)
    return fig


def plot_neighbour_similarity(
    results: dict[str, dict], path: Path, rule: OutlierRule | None = None
) -> Path:
    """``draw_neighbour_similarity`` written to ``path``."""
    return save(draw_neighbour_similarity(results, rule), path)

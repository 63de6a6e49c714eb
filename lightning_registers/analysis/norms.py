"""Where the high-norm tokens are: the norm distribution of output patch tokens (paper Fig. 4)
and the high-norm share and norm percentiles of every layer (Fig. 5a)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..measures.figures import histogram_range, plt, save_figure
from ..measures.norms import OUTPUT, RULES, OutlierRule, high_norm_stats

PERCENTILES = (1, 25, 50, 75, 99)
SHARE_RULES = tuple(OutlierRule(kind) for kind in RULES)


def norm_statistics(norms: torch.Tensor, threshold: float = 150.0, factor: float = 3.0) -> dict:
    """Scalars of a set of patch-token norms: the high-norm share by each rule
    (``high_norm_share_absolute``: above ``threshold``; ``high_norm_share_relative``: above
    ``factor`` x the median), the percentiles ``pNN`` and the maximum."""
    flat = norms.flatten().float()
    shares = high_norm_stats(flat, threshold, factor)
    quantiles = torch.quantile(flat, torch.tensor(PERCENTILES, dtype=torch.float) / 100)
    stats = {key: shares[key] for key in (rule.share_key for rule in SHARE_RULES)}
    stats.update({f"p{p}": q.item() for p, q in zip(PERCENTILES, quantiles, strict=True)})
    stats["max"] = shares["max"]
    return stats


def layer_statistics(
    norms_by_layer: dict[str, torch.Tensor], threshold: float = 150.0, factor: float = 3.0
) -> dict[str, dict]:
    """``norm_statistics`` of every layer of ``patch_norms_by_layer``."""
    return {
        layer: norm_statistics(norms, threshold, factor) for layer, norms in norms_by_layer.items()
    }


def first_high_norm_layer(stats: dict[str, dict], key: str, level: float = 0.005) -> str | None:
    """The first block whose high-norm share (``key``) reaches ``level``, or None."""
    return next((layer for layer in stats if layer != OUTPUT and stats[layer][key] >= level), None)


def plot_norm_distributions(
    norms: dict[str, torch.Tensor], rule: OutlierRule, path: Path, title: str
) -> Path:
    """Histograms of output patch-token norms, one panel per model, log counts, with the
    high-norm cut of ``rule`` (paper Fig. 4)."""
    fig, axes = plt.subplots(1, len(norms), figsize=(4 * len(norms), 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], norms.items(), strict=True):
        values = values.flatten().float()
        cut = rule.cut(values)
        share = (values > cut).float().mean().item()
        ax.hist(values.numpy(), bins=80, range=histogram_range(values), log=True, color="tab:blue")
        ax.axvline(cut, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(f"{name}\n{100 * share:.2f}% above {cut:.3g}", fontsize=9)
        ax.set_xlabel("output patch-token norm", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def plot_layer_statistics(stats: dict[str, dict[str, dict]], path: Path, title: str) -> Path:
    """Per model: norm percentiles (band p1-p99, line median) and the high-norm shares against
    the block (paper Fig. 5a)."""
    fig, axes = plt.subplots(2, len(stats), figsize=(4.5 * len(stats), 5.5), squeeze=False)
    for column, (name, by_layer) in enumerate(stats.items()):
        layers = [layer for layer in by_layer if layer != OUTPUT]
        x = range(len(layers))
        top, bottom = axes[0, column], axes[1, column]

        def get(key: str, by_layer=by_layer, layers=layers) -> list[float]:
            return [by_layer[layer][key] for layer in layers]

        top.fill_between(x, get("p1"), get("p99"), alpha=0.25, label="p1-p99")
        top.fill_between(x, get("p25"), get("p75"), alpha=0.4, label="p25-p75")
        top.plot(x, get("p50"), color="black", label="median")
        top.plot(x, get("max"), color="tab:red", linestyle=":", label="max")
        top.set_yscale("log")
        top.set_xticks(list(x), [])
        top.set_title(name, fontsize=9)
        top.set_ylabel("patch-token norm", fontsize=8)
        top.legend(fontsize=7)
        for key, label in ((rule.share_key, rule.kind) for rule in SHARE_RULES):
            bottom.plot(x, [100 * v for v in get(key)], marker="o", label=label)
        bottom.set_ylabel("high-norm patch tokens (%)", fontsize=8)
        bottom.set_xticks(list(x))
        bottom.set_xticklabels(layers, rotation=60, fontsize=7)
        bottom.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)

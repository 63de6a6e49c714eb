"""Where the high-norm tokens are: the norm distribution of output patch tokens (paper Fig. 4)
and the high-norm share and norm percentiles of every layer (Fig. 5a)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..measures.figures import plt
from ..measures.norms import OUTPUT, RULES, OutlierRule, high_norm_stats
from .figure_style import (
    ABSOLUTE_STYLE,
    NO_HIGH_NORM,
    RELATIVE_STYLE,
    draw_thresholds,
    legend_outside,
    note,
    rule_text,
    save,
)

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


FIRST_LEVEL = 0.005  # the high-norm share from which a block counts as having high-norm tokens


def first_high_norm_layer(
    stats: dict[str, dict], key: str, level: float = FIRST_LEVEL
) -> str | None:
    """The first block whose high-norm share (``key``) reaches ``level``, or None."""
    return next((layer for layer in stats if layer != OUTPUT and stats[layer][key] >= level), None)


def _positive(values: torch.Tensor) -> torch.Tensor:
    # Log axes: a zero norm (an all-zero token) is drawn at the smallest positive one.
    return values.flatten().float().clamp_min(torch.finfo(torch.float32).tiny)


def draw_norm_distributions(norms: dict[str, torch.Tensor], rule: OutlierRule, title: str):
    """Histograms of output patch-token norms, one panel per model, both axes logarithmic, with
    both thresholds of ``rule`` (absolute: ``rule.threshold``; relative: ``rule.factor`` x the
    median) and the share of tokens above each (paper Fig. 4). Returns the figure."""
    fig, axes = plt.subplots(
        1, len(norms), figsize=(4.2 * len(norms), 3.6), squeeze=False, layout="constrained"
    )
    for ax, (name, values) in zip(axes[0], norms.items(), strict=True):
        values = _positive(values)
        median = values.median().item()
        cuts = (rule.threshold, rule.factor * median)
        low = min(values.min().item(), *cuts) / 1.05
        high = max(values.max().item(), *cuts) * 1.05
        ax.hist(values.numpy(), bins=np.geomspace(low, high, 81), log=True, color="tab:blue")
        shares = {
            kind: OutlierRule(kind, rule.threshold, rule.factor).share(values) for kind in RULES
        }
        draw_thresholds(ax, rule, median, shares)
        ax.set_xscale("log")
        ax.set_title(f"{name} ({len(values)} tokens)", fontsize=9)
        ax.set_xlabel("output patch-token L2 norm (log scale)", fontsize=8)
        ax.set_ylabel("patch tokens (count, log scale)", fontsize=8)
        legend_outside(ax, "below")
    fig.suptitle(title, fontsize=10)
    return fig


def plot_norm_distributions(
    norms: dict[str, torch.Tensor], rule: OutlierRule, path: Path, title: str
) -> Path:
    """``draw_norm_distributions`` written to ``path``."""
    return save(draw_norm_distributions(norms, rule, title), path)


def _label(text: str, label: bool) -> str | None:
    return text if label else None


def _draw_norms(ax, x: list[float], rows: list[dict], rule: OutlierRule, label: bool) -> None:
    """Percentile bands, median, max and the relative threshold at ``x``, one statistics dict
    of ``rows`` each; legend labels only where ``label``."""

    def get(key: str) -> list[float]:
        return [row[key] for row in rows]

    ax.fill_between(
        x, get("p1"), get("p99"), color="tab:blue", alpha=0.2, label=_label("p1-p99", label)
    )
    ax.fill_between(
        x, get("p25"), get("p75"), color="tab:blue", alpha=0.45, label=_label("p25-p75", label)
    )
    ax.plot(x, get("p50"), color="black", label=_label("median", label))
    ax.plot(x, get("max"), color="tab:orange", marker="^", markersize=3, label=_label("max", label))
    relative = _label(f"relative threshold ({rule.factor:g} x median)", label)
    ax.plot(x, [rule.factor * m for m in get("p50")], **RELATIVE_STYLE, label=relative)


def _draw_shares(ax, x: list[float], rows: list[dict], rule: OutlierRule, label: bool) -> None:
    """The high-norm share by each rule at ``x``, in %; the relative rule's larger markers ring
    the absolute rule's where the two agree."""
    for kind, style, marker in (
        ("relative", RELATIVE_STYLE, {"marker": "o", "markersize": 8}),
        ("absolute", ABSOLUTE_STYLE, {"marker": "s", "markersize": 4}),
    ):
        kind_rule = OutlierRule(kind, rule.threshold, rule.factor)
        ax.plot(
            x,
            [100 * row[kind_rule.share_key] for row in rows],
            **style,
            **marker,
            markerfacecolor="none",
            label=_label(f"{kind} rule ({rule_text(kind_rule)})", label),
        )


def draw_layer_statistics(stats: dict[str, dict[str, dict]], rule: OutlierRule, title: str):
    """Per model, against the layer (every block, then the normalized ``output``): patch-token
    norm percentiles (bands p1-p99 and p25-p75, median, max) with both thresholds of ``rule``,
    and the high-norm share by each rule (paper Fig. 5a). Returns the figure."""
    fig, axes = plt.subplots(
        2,
        len(stats),
        figsize=(4.5 * len(stats), 5.5),
        squeeze=False,
        sharex="col",
        layout="constrained",
    )
    for column, (name, by_layer) in enumerate(stats.items()):
        blocks = [layer for layer in by_layer if layer != OUTPUT]
        top, bottom = axes[0, column], axes[1, column]
        end = len(blocks)  # the output's position, after the blocks
        rows, output = [by_layer[block] for block in blocks], by_layer[OUTPUT]
        _draw_norms(top, list(range(end)), rows, rule, True)
        _draw_norms(top, [end - 0.3, end + 0.3], [output, output], rule, False)
        _draw_shares(bottom, list(range(end)), rows, rule, True)
        _draw_shares(bottom, [end], [output], rule, False)
        top.axhline(
            rule.threshold, **ABSOLUTE_STYLE, label=f"absolute threshold {rule.threshold:g}"
        )
        top.set_yscale("log")
        top.set_title(name, fontsize=9)
        top.set_ylabel("patch-token L2 norm (log scale)", fontsize=8)
        largest = max(100 * row[r.share_key] for row in by_layer.values() for r in SHARE_RULES)
        bottom.set_ylim(0, max(1.0, 1.15 * largest))
        if largest == 0:
            note(bottom, f"{NO_HIGH_NORM} at any layer")
        bottom.set_ylabel("high-norm patch tokens (%)", fontsize=8)
        bottom.set_xticks(range(end + 1), [*blocks, OUTPUT], rotation=45, fontsize=7)
        for ax in (top, bottom):
            ax.axvline(end - 0.5, color="0.7", linewidth=0.8)
    legend_outside(axes[0, -1])
    legend_outside(axes[1, -1])
    fig.supxlabel(
        "layer: the residual stream after each block, output after the final norm", fontsize=8
    )
    fig.suptitle(title, fontsize=10)
    return fig


def plot_layer_statistics(
    stats: dict[str, dict[str, dict]], rule: OutlierRule, path: Path, title: str
) -> Path:
    """``draw_layer_statistics`` written to ``path``."""
    return save(draw_layer_statistics(stats, rule, title), path)

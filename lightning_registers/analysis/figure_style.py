"""What the figures of ``analyze`` share: both high-norm thresholds drawn the same way, legends
outside the data, words where a panel has nothing to show, and a PNG written atomically with
every label inside the image."""

from __future__ import annotations

from pathlib import Path

from ..measures.figures import plt
from ..measures.norms import OutlierRule
from ..objectives.checkpoint_io import write_file_atomically

DPI = 150
NA = "n/a"
NO_HIGH_NORM = "no high-norm tokens"
ABSOLUTE_STYLE = {"color": "tab:red", "linestyle": "--", "linewidth": 1.2}
RELATIVE_STYLE = {"color": "tab:purple", "linestyle": ":", "linewidth": 1.5}


def rule_text(rule: OutlierRule) -> str:
    """How ``rule`` tells high-norm tokens, in words: ``norm > 150`` or ``norm > 3 x median``."""
    if rule.kind == "absolute":
        return f"norm > {rule.threshold:g}"
    return f"norm > {rule.factor:g} x median"


def threshold_labels(rule: OutlierRule, median: float) -> dict[str, str]:
    """Legend labels of the two thresholds (``absolute``, ``relative``) at ``median``, the one
    ``rule`` uses to split tokens marked."""
    labels = {
        "absolute": f"absolute threshold {rule.threshold:g}",
        "relative": f"relative threshold {rule.factor:g} x median = {rule.factor * median:.3g}",
    }
    labels[rule.kind] += " (splits tokens)"
    return labels


def draw_thresholds(ax, rule: OutlierRule, median: float, shares: dict[str, float]) -> None:
    """Vertical lines at both thresholds of ``rule`` for norms of this ``median``, labelled with
    the share of tokens above each (``shares``: 0..1 by rule kind)."""
    labels = threshold_labels(rule, median)
    cuts = {"absolute": rule.threshold, "relative": rule.factor * median}
    for kind, style in (("absolute", ABSOLUTE_STYLE), ("relative", RELATIVE_STYLE)):
        label = f"{labels[kind]}: {100 * shares[kind]:.2f} % above"
        ax.axvline(cuts[kind], label=label, **style)


def legend_outside(ax, where: str = "right", **kwargs):
    """``ax``'s legend beside the axes (``right``) or under them (``below``), off the data."""
    if where == "right":
        place = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)}
    else:
        place = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.22)}
    return ax.legend(**place, borderaxespad=0.0, fontsize=7, frameon=False, **kwargs)


def note(ax, text: str) -> None:
    """``text`` in words in the middle of ``ax``, for a panel with nothing to draw."""
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        fontsize=9,
        color="0.3",
        bbox={"facecolor": "white", "edgecolor": "0.6", "boxstyle": "round"},
    )


def save(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (atomically; the image grows to every label and legend
    outside the axes) and close it."""
    write_file_atomically(
        path,
        lambda stream: fig.savefig(
            stream, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.1
        ),
    )
    plt.close(fig)
    return path

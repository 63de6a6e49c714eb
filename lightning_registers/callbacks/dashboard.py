"""The Artifacts dashboard: the TensorBoard tag names of the artifact scalars and texts, and the
custom-scalars layout that gathers them into one chart per quantity with a line per layer."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..measures.norms import RULES, OutlierRule

ARTIFACTS = "artifacts"
"""The first part of every artifact tag (its group in TensorBoard's Scalars and Text tabs)."""
DASHBOARD = "Artifacts"
"""The custom-scalars category of the dashboard."""
PRESENT = "present"
STATUS = "status"
PERCENT_KEYS = frozenset(
    {
        *(OutlierRule(kind).share_key for kind in RULES),
        "image_share_max",
        "background_share",
        "cls_attention_on_high_norm",
    }
)
"""The per-layer scalars that are shares: logged in percent (0-100)."""


def scalar_tag(name: str, key: str, layer: str | None = None) -> str:
    """``artifacts/NAME/KEY/LAYER``: the layer last, so that a card title cut in the middle
    still names it; ``artifacts/NAME/KEY`` for a per-backbone scalar or text."""
    return "/".join([ARTIFACTS, name, key, *([layer] if layer else [])])


def logged_value(key: str, value: float) -> float:
    """``value`` in the unit of its tag: shares (0..1) in percent."""
    return 100 * value if key in PERCENT_KEYS else value


def read_value(key: str, value: float) -> float:
    """A logged value back in the unit of the measurements (shares 0..1)."""
    return value / 100 if key in PERCENT_KEYS else value


def lines(name: str, key: str, layers: Sequence[str]) -> list[str]:
    """The tag pattern of a chart with a line per layer of ``layers``: matches exactly
    ``scalar_tag(name, key, layer)`` for those layers (TensorBoard reads each entry of a
    custom-scalars chart as a regular expression)."""
    alternatives = "|".join(re.escape(layer) for layer in layers)
    return [f"^{re.escape(scalar_tag(name, key))}/({alternatives})$"]


def layer_charts(
    name: str, layers: Sequence[str], rules: dict[str, OutlierRule]
) -> dict[str, list[str]]:
    """The charts of one backbone's watched ``layers``, by title: the high-norm share by each
    of ``rules`` (by legend label, the monitor's own rule first) and the max/median norm."""
    charts = {
        f"{name}: high-norm patch tokens (%), {label}": lines(name, rule.share_key, layers)
        for label, rule in rules.items()
    }
    charts[f"{name}: max / median patch-token norm"] = lines(name, "max_over_median", layers)
    return charts


def layout(charts: dict[str, list[str]]) -> dict[str, dict[str, list]]:
    """The custom-scalars layout of the dashboard (``SummaryWriter.add_custom_scalars``):
    ``charts`` (title -> tag patterns) as multi-line charts in the ``Artifacts`` category."""
    return {DASHBOARD: {title: ["Multiline", tags] for title, tags in charts.items()}}

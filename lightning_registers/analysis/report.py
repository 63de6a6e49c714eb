"""``summary.json`` (every scalar of an analysis) and ``summary.md`` (the main ones in tables,
a column per checkpoint, the reason for each empty cell under its table)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ..measures.norms import OutlierRule
from .figure_style import rule_text
from .norms import FIRST_LEVEL

_LOST_KEYS = ("corloc", "corloc_centred", "evaluated", "k")
_MISSING = "–"
_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
_TOKEN_WORDS = {"patches": "patch tokens", "all": "tokens"}


def _percent(value) -> str:
    return f"{100 * value:.2f}"


def _number(value, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


def _search_summary(search: dict) -> dict:
    rule = search["rule"]
    cut = {"threshold": rule.threshold} if rule.kind == "absolute" else {"factor": rule.factor}
    return {"family": search["family"], "rule": rule.kind, **cut} | {
        key: search[key]
        for key in ("layer", "top_layer", "top_k", "tokens", "average", "sparsity", "values")
    }


def model_summary(result: dict, loaded, images) -> dict:
    """The JSON-able scalars of one backbone's ``analyze_backbone`` result."""
    probes = result["probes"]
    summary = {
        "checkpoint": loaded.name,
        "backbone": loaded.model.config.as_kwargs(),
        "images": {"count": len(images), "image_size": images.image_size},
        "norms": result["norm_summary"],
        "neighbour_similarity": {
            "high_norm": result["neighbours"]["mean_high_norm"],
            "normal": result["neighbours"]["mean_normal"],
        },
        "probes": probes,
        "attention_on_high_norm": result["attention_on_high_norm"],
        "lost": {k: result["lost"][k] for k in _LOST_KEYS},
        "test_time_registers": {
            "search": _search_summary(result["ttr_search"]),
            "neurons": [],
            "after": None,
        },
    }
    ttr = result["ttr"]
    if ttr is not None:
        summary["test_time_registers"] |= {
            "neurons": [asdict(n) for n in ttr["neurons"]],
            "after": {
                "norms": ttr["norm_summary"],
                "attention_on_high_norm": ttr["attention_on_high_norm"],
                "lost": {k: ttr["lost"][k] for k in _LOST_KEYS},
            },
            "normal_token_cosine": ttr["normal_token_cosine"],
            "high_norm_token_cosine": ttr["high_norm_token_cosine"],
        }
    return summary


def _dig(tree, path: str):
    """The value at a dotted ``path``, None where it or a part above it is missing."""
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _search_cut(search: dict) -> str:
    return f"{search['threshold']:g}" if "threshold" in search else f"{search['factor']:g} x median"


def _why_missing(path: str, model: dict, settings: dict) -> str:
    """Why ``model``'s value at ``path`` is missing, in words."""
    split = rule_text(OutlierRule(settings["rule"], settings["threshold"], settings["factor"]))
    ttr = model["test_time_registers"]
    kind = "high-norm" if "high_norm" in path else "normal"
    if path.startswith("test_time_registers") and not ttr["neurons"]:
        search = ttr["search"]
        tokens = _TOKEN_WORDS.get(search["tokens"], search["tokens"])
        return (
            f"not run: no register neurons to move, as none of the {tokens} is above "
            f"{_search_cut(search)} after block {search['layer']}"
        )
    if path == "norms.first_high_norm_block.relative":
        return (
            f"no block has {100 * FIRST_LEVEL:g} % of its patch tokens above "
            f"{settings['factor']:g} x its median norm"
        )
    if path.startswith("probes.classification"):
        if model["probes"]["classification"] is None:
            return "not run: the class probe needs labels of at least two classes"
        which = path.split(".")[2]
        if model["probes"]["classification"][which]["test_images"] == 0:
            return f"no test image has a {kind} token ({split})"
        return f"fewer than two classes among the training images with a {kind} token"
    if path.startswith("probes"):
        return f"no {kind} token among the probes' test images ({split})"
    if path.startswith("lost"):
        return "no image with a ground-truth box to score"
    return f"no {kind} output patch tokens ({split})"


class _Notes:
    """The reasons for a table's empty cells, numbered in order of first use."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def mark(self, reason: str) -> str:
        """An empty cell pointing to ``reason``."""
        if reason not in self.reasons:
            self.reasons.append(reason)
        return _MISSING + str(self.reasons.index(reason) + 1).translate(_SUPERSCRIPTS)

    def lines(self) -> list[str]:
        return [
            f"- {_MISSING}{str(i).translate(_SUPERSCRIPTS)}: {reason}."
            for i, reason in enumerate(self.reasons, 1)
        ]


# (label, dotted paths into a model summary, format, separator); "ttr" = test-time registers.
_MAIN_ROWS = [
    ("registers", ["backbone.num_registers"], str, ""),
    (
        "output high-norm share, absolute (%)",
        ["norms.output.high_norm_share_absolute"],
        _percent,
        "",
    ),
    (
        "output high-norm share, relative (%)",
        ["norms.output.high_norm_share_relative"],
        _percent,
        "",
    ),
    ("output norm median / max", ["norms.output.p50", "norms.output.max"], _number, " / "),
    (
        "first block with high-norm tokens (relative rule)",
        ["norms.first_high_norm_block.relative"],
        str,
        "",
    ),
    (
        "neighbour cosine, high-norm / normal",
        ["neighbour_similarity.high_norm", "neighbour_similarity.normal"],
        _number,
        " / ",
    ),
    (
        "position top-1, high-norm / normal (%)",
        ["probes.position.top1.high_norm", "probes.position.top1.normal"],
        _percent,
        " / ",
    ),
    (
        "position distance, high-norm / normal",
        ["probes.position.distance.high_norm", "probes.position.distance.normal"],
        _number,
        " / ",
    ),
    (
        "pixel L2, high-norm / normal",
        ["probes.pixels.l2.high_norm", "probes.pixels.l2.normal"],
        _number,
        " / ",
    ),
    (
        "class from [CLS] / normal / high-norm token (%)",
        [f"probes.classification.{k}.accuracy" for k in ("cls", "normal", "high_norm")],
        _percent,
        " / ",
    ),
    (
        "[CLS] attention on high-norm patches / their share of patches (%)",
        ["attention_on_high_norm.cls", "attention_on_high_norm.share_of_patches"],
        _percent,
        " / ",
    ),
    ("LOST CorLoc / centred box (%)", ["lost.corloc", "lost.corloc_centred"], _percent, " / "),
]
_TTR = "test_time_registers.after."
_TTR_ROWS = [
    (
        "output high-norm share, relative (%)",
        ["norms.output.high_norm_share_relative", _TTR + "norms.output.high_norm_share_relative"],
        _percent,
        " → ",
    ),
    (
        "output high-norm share, absolute (%)",
        ["norms.output.high_norm_share_absolute", _TTR + "norms.output.high_norm_share_absolute"],
        _percent,
        " → ",
    ),
    (
        "[CLS] attention on the high-norm patches (%)",
        ["attention_on_high_norm.cls", _TTR + "attention_on_high_norm.cls"],
        _percent,
        " → ",
    ),
    ("LOST CorLoc (%)", ["lost.corloc", _TTR + "lost.corloc"], _percent, " → "),
    (
        "cosine of each normal token, after vs before",
        ["test_time_registers.normal_token_cosine"],
        lambda v: _number(v, 4),
        "",
    ),
]


def _table(title: str, rows: list, models: dict, settings: dict) -> list[str]:
    """A markdown table, a column per model, each empty cell marked with its reason, the
    reasons listed under the table."""
    notes = _Notes()
    lines = [f"| {title} | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for label, paths, fmt, sep in rows:
        cells = []
        for model in models.values():
            values = [(path, _dig(model, path)) for path in paths]
            cells.append(
                sep.join(
                    notes.mark(_why_missing(path, model, settings)) if value is None else fmt(value)
                    for path, value in values
                )
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if notes.reasons:
        lines += ["", *notes.lines()]
    return lines


def _neurons(summary: dict) -> str:
    ttr = summary["test_time_registers"]
    search = ttr["search"]
    family = f", {search['family']}" if search["family"] else ""
    how = (
        f" (outliers: {search['tokens']} tokens above {_search_cut(search)} after block "
        f"{search['layer']}{family}; blocks up to {search['top_layer']}; values {search['values']})"
    )
    if not ttr["neurons"]:
        return "none (no outliers)" + how
    return ", ".join(f"{n['block']}:{n['neuron']}" for n in ttr["neurons"]) + how


def _protocol(protocol: dict) -> str:
    lost = (
        f"LOST on {protocol['lost_input']} images, {protocol['lost_ties']} ties, CorLoc over "
        f"{protocol['corloc_over']} images" + (", no hard objects" if protocol["no_hard"] else "")
    )
    ttr = (
        f"test-time registers: {protocol['ttr_values']} values, outliers among "
        f"{protocol['ttr_tokens']} tokens, {protocol['ttr_average']} scores"
        + (", sparsity filter" if protocol["ttr_sparsity"] else "")
    )
    return f"Protocol: **{protocol['name']}** ({lost}; {ttr})."


def markdown(summary: dict) -> str:
    """The tables of ``summary.md``."""
    models, settings, images = summary["models"], summary["settings"], summary["images"]
    out = [
        "# Register analysis",
        "",
        _protocol(summary["protocol"]),
        "",
        f"Images: {images['source']} ({images['count']} read, {images['skipped']} skipped, "
        f"{images['with_labels']} with labels, {images['with_boxes']} with boxes). High-norm "
        f"tokens in the split measures: {settings['rule']} rule (absolute: norm > "
        f"{settings['threshold']:g}; relative: norm > {settings['factor']:g} x median).",
        "",
        *_table("measure", _MAIN_ROWS, models, settings),
        "",
        "## Test-time registers (before → after)",
        "",
        *_table("", _TTR_ROWS, models, settings),
        "",
        "Register neurons (block:neuron): "
        + "; ".join(f"{name}: {_neurons(m)}" for name, m in models.items()),
        "",
        "## Figures",
        "",
        *(f"- [{name}]({name})" for name in summary["figures"]),
    ]
    return "\n".join(out) + "\n"


def write_summary(results, inputs, backbones, names, settings, figures, out_dir: Path) -> dict:
    """Write ``summary.json`` and ``summary.md``; returns the summary."""
    first = next(iter(inputs.values()))
    summary = {
        "images": {
            "source": first.source,
            "count": len(first),
            "skipped": first.skipped,
            "with_labels": int((first.labels >= 0).sum()),
            "with_boxes": sum(1 for b in first.boxes if len(b)),
        },
        "protocol": settings.protocol_summary(),
        "settings": asdict(settings),
        "models": {
            name: model_summary(results[name], loaded, inputs[name])
            for name, loaded in zip(names, backbones, strict=True)
        },
        "figures": [str(Path(f).relative_to(out_dir)) for f in figures],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown(summary))
    return summary

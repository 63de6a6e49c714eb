"""``summary.json`` (every scalar of an analysis) and ``summary.md`` (the main ones in tables,
a column per checkpoint)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

_LOST_KEYS = ("corloc", "corloc_centred", "evaluated", "k")


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


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
        "images": {"count": len(images), "image_size": images.images.shape[-1]},
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
    for key in path.split("."):
        tree = tree[key]
    return tree


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
    ("first block with high-norm tokens", ["norms.first_high_norm_block.relative"], str, ""),
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


def _table(title: str, rows: list, models: dict) -> list[str]:
    lines = [f"| {title} | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for label, paths, fmt, sep in rows:
        cells = []
        for summary in models.values():
            try:
                cells.append(sep.join(fmt(_dig(summary, path)) for path in paths))
            except (KeyError, TypeError):
                cells.append("–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _neurons(summary: dict) -> str:
    ttr = summary["test_time_registers"]
    search = ttr["search"]
    family = f", {search['family']}" if search["family"] else ""
    cut = search.get("threshold", f"{search.get('factor')} x median")
    how = (
        f" (outliers: {search['tokens']} tokens above {cut} after block {search['layer']}"
        f"{family}; blocks up to {search['top_layer']}; values {search['values']})"
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
        *_table("measure", _MAIN_ROWS, models),
        "",
        "## Test-time registers (before → after)",
        "",
        *_table("", _TTR_ROWS, models),
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

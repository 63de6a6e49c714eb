"""Emergence curves across runs: the monitors' per-layer high-norm share and max/median norm
ratio against the training step, read back from each run's TensorBoard event files, with the
emergence events marked; written as a figure (``curves.png``), ``curves.csv`` and
``curves.json``: ``lightning-registers curves RUN_DIR... --out DIR``."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ..callbacks.dashboard import ARTIFACTS, PRESENT, read_value
from ..callbacks.emergence import EVENTS_FILE
from ..measures.figures import plt, save_figure
from ..measures.norms import OUTPUT, OutlierRule

DRAWN = (OutlierRule("relative").share_key, "max_over_median")
"""The per-layer scalars drawn, one row of panels each."""
LABELS = {DRAWN[0]: "high-norm share (norm > 3 x median)", DRAWN[1]: "max / median norm"}
EVENT_TEXT = re.compile(r"step (\d+): high-norm artifacts (emerged|vanished) in (\S+) \((\S+):")
EVENT_STYLE = {"emerged": ("tab:red", "--"), "vanished": ("tab:gray", ":")}
LAYER = re.compile(rf"block\d+|{OUTPUT}")
Series = list[tuple[int, float]]


@dataclass
class RunCurves:
    """The monitors' scalars of one run: ``layers[backbone][layer][key]`` and
    ``present[backbone]`` as (step, value) series (shares 0..1), and its emergence events."""

    name: str
    path: Path
    layers: dict[str, dict[str, dict[str, Series]]] = field(default_factory=dict)
    present: dict[str, Series] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)


def event_dir(path: str | Path) -> Path:
    """The folder of a run's event files: ``path`` itself, or its newest ``version_N``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if any(path.glob("events.out.tfevents.*")):
        return path
    versions = [p for p in path.glob("version_*") if p.name[8:].isdigit()]
    for version in sorted(versions, key=lambda p: int(p.name[8:]), reverse=True):
        if any(version.glob("events.out.tfevents.*")):
            return version
    raise FileNotFoundError(
        f"run directory {path} has no TensorBoard event files (events.out.tfevents.*) in it "
        "or in a version_N folder"
    )


def read_run(path: str | Path, name: str | None = None) -> RunCurves:
    """The ``artifacts/...`` scalars and the emergence events of the run in ``path`` (a run
    folder, or an experiment folder whose newest version is read). Events come from
    ``artifact_events.jsonl``, else from the TensorBoard text events."""
    folder = event_dir(path)
    run = RunCurves(name or f"{folder.parent.name}/{folder.name}", folder)
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    for tag in tags["scalars"]:
        parsed = parse_tag(tag)
        if parsed is None:
            continue
        backbone, key, layer, percent = parsed
        series = [
            (e.step, read_value(key, e.value) if percent else e.value)
            for e in accumulator.Scalars(tag)
        ]
        # A run resumed after an upgrade has both tag schemes: one series, in step order.
        if layer:
            keys = run.layers.setdefault(backbone, {}).setdefault(layer, {})
            keys[key] = joined(keys.get(key, []), series)
        elif key == PRESENT:
            run.present[backbone] = joined(run.present.get(backbone, []), series)
    events_file = folder / EVENTS_FILE
    if events_file.is_file():
        lines = events_file.read_text().splitlines()
        run.events = [json.loads(line) for line in lines if line.strip()]
    elif "artifacts/events/text_summary" in tags["tensors"]:
        for text in accumulator.Tensors("artifacts/events/text_summary"):
            match = EVENT_TEXT.match(text.tensor_proto.string_val[0].decode())
            if match:
                step, kind, backbone, layer = match.groups()
                run.events.append(
                    {"event": kind, "step": int(step), "backbone": backbone, "layer": layer}
                )
    if not run.layers:
        raise ValueError(
            f"run {folder} has no monitor scalars (artifacts/NAME/KEY/LAYER): was a "
            "TokenNormMonitor among its callbacks?"
        )
    return run


def joined(series: Series, more: Series) -> Series:
    """Two (step, value) series as one in step order; ``more`` wins at a step both have."""
    return sorted({**dict(series), **dict(more)}.items())


def parse_tag(tag: str) -> tuple[str, str, str | None, bool] | None:
    """(backbone, key, layer, whether its shares are in percent) of a monitor scalar
    ``artifacts/NAME/KEY/LAYER`` (layer None for ``artifacts/NAME/KEY``), or None for any other
    tag. Runs logged with the layer before the key (``artifacts/NAME/LAYER/KEY``, shares as
    0..1) are read as well."""
    parts = tag.split("/")
    if parts[0] != ARTIFACTS or len(parts) not in (3, 4):
        return None
    if len(parts) == 3:
        return parts[1], parts[2], None, False
    _, backbone, key, layer = parts
    if LAYER.fullmatch(key):
        return backbone, layer, key, False
    return backbone, key, layer, True


def layer_order(layers) -> list[str]:
    """Layers in network order: blocks by index, then the output."""
    return sorted(layers, key=lambda layer: (layer == OUTPUT, layer))


def summary(run: RunCurves) -> dict:
    """Per backbone: the last step checked and, per scalar, its largest value with the layer and
    step; the share at the output at the last check; the number of events."""
    out = {}
    for backbone, layers in run.layers.items():
        best: dict[str, dict] = {}
        last = 0
        for layer in layer_order(layers):
            for key, series in layers[layer].items():
                step, value = max(series, key=lambda point: point[1])
                last = max(last, series[-1][0])
                if key not in best or value > best[key]["value"]:
                    best[key] = {"value": value, "layer": layer, "step": step}
        final = layers.get(OUTPUT, {}).get(DRAWN[0])
        out[backbone] = {
            "last_step": last,
            "largest": best,
            "final_output_share": final[-1][1] if final else None,
            "events": sum(e.get("backbone") == backbone for e in run.events),
        }
    return out


def rows(runs: list[RunCurves]) -> Iterator[dict]:
    """Every point of every series, one row each (for CSV)."""
    for run in runs:
        for backbone, layers in run.layers.items():
            for layer in layer_order(layers):
                for key, series in sorted(layers[layer].items()):
                    for step, value in series:
                        yield {
                            "run": run.name,
                            "backbone": backbone,
                            "layer": layer,
                            "key": key,
                            "step": step,
                            "value": value,
                        }


def plot_curves(runs: list[RunCurves], path: Path, keys=DRAWN) -> Path:
    """``curves_figure`` written to ``path``."""
    return save_figure(curves_figure(runs, keys), path)


def curves_figure(runs: list[RunCurves], keys=DRAWN):
    """A column per run and backbone, a row per scalar of ``keys``: a line per layer (deeper is
    yellower, the output black), dashed red at each emergence, dotted grey at each vanishing."""
    columns = [(run, backbone) for run in runs for backbone in run.layers]
    fig, axes = plt.subplots(
        len(keys),
        len(columns),
        figsize=(4.2 * len(columns), 2.8 * len(keys)),
        squeeze=False,
        sharey="row",
    )
    for col, (run, backbone) in enumerate(columns):
        layers = layer_order(run.layers[backbone])
        blocks = [layer for layer in layers if layer != OUTPUT]
        colours = plt.get_cmap("viridis")
        for row, key in enumerate(keys):
            ax = axes[row, col]
            for layer in layers:
                series = run.layers[backbone][layer].get(key)
                if not series:
                    continue
                colour = (
                    "black"
                    if layer == OUTPUT
                    else colours(blocks.index(layer) / max(len(blocks) - 1, 1))
                )
                steps, values = zip(*series, strict=True)
                ax.plot(steps, values, color=colour, lw=1.0, label=layer)
            for event in run.events:
                if event.get("backbone", backbone) == backbone:
                    colour, style = EVENT_STYLE.get(event["event"], ("tab:blue", "-"))
                    ax.axvline(event["step"], color=colour, ls=style, lw=1.2)
                    if row == 0:
                        ax.annotate(
                            f"{event['event']} ({event.get('layer', '?')})",
                            (event["step"], 1),
                            xycoords=("data", "axes fraction"),
                            fontsize=7,
                            color=colour,
                            rotation=90,
                            va="top",
                            ha="right",
                        )
            if row == 0:
                ax.set_title(f"{run.name} ({backbone})", fontsize=9)
            if row == len(keys) - 1:
                ax.set_xlabel("step", fontsize=8)
            if col == 0:
                ax.set_ylabel(LABELS.get(key, key.replace("_", " ")), fontsize=8)
            ax.tick_params(labelsize=7)
    if axes[0, 0].get_legend_handles_labels()[0]:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        axes[0, -1].legend(
            handles,
            labels,
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=6,
            title="layer",
            title_fontsize=7,
        )
    return fig


@contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix) that is renamed over it on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temp
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_curves(runs: list[RunCurves], out_dir: str | Path) -> dict[str, Path]:
    """``curves.png``, ``curves.csv`` and ``curves.json`` (series, events and ``summary`` of
    each run) under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"curves.{name}" for name in ("png", "csv", "json")}
    with _atomic(paths["png"]) as temp:
        plot_curves(runs, temp)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["run", "backbone", "layer", "key", "step", "value"])
    writer.writeheader()
    writer.writerows(rows(runs))
    with _atomic(paths["csv"]) as temp:
        temp.write_text(buffer.getvalue())
    document = {
        "runs": [
            {
                "name": run.name,
                "path": str(run.path),
                "layers": run.layers,
                "present": run.present,
                "events": run.events,
                "summary": summary(run),
            }
            for run in runs
        ]
    }
    with _atomic(paths["json"]) as temp:
        temp.write_text(json.dumps(document, indent=1) + "\n")
    return paths


def _cell(best: dict | None, scale: float, unit: str) -> str:
    if best is None:
        return "-"
    if best["value"] == 0:
        return "0 (at every check)"
    return f"{scale * best['value']:.2f}{unit} ({best['layer']}, step {best['step']})"


def summary_table(runs: list[RunCurves]) -> str:
    """A Markdown table of each run's ``summary``."""
    lines = [
        "| run | backbone | last step | largest share | largest max/median | output share at "
        "the end | events |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for backbone, s in summary(run).items():
            share = _cell(s["largest"].get(DRAWN[0]), 100, "%")
            ratio = _cell(s["largest"].get(DRAWN[1]), 1, "")
            final = s["final_output_share"]
            final = "-" if final is None else f"{100 * final:.2f}%"
            lines.append(
                f"| {run.name} | {backbone} | {s['last_step']} | {share} | {ratio} | {final} | "
                f"{s['events']} |"
            )
    return "\n".join(lines)


def curves_main(args: list[str]) -> None:
    """``lightning-registers curves RUN_DIR... --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="lightning-registers curves",
        description="Emergence curves of several runs side by side: high-norm share and "
        "max/median norm per layer against the step, with the emergence events; writes "
        "curves.png, curves.csv and curves.json to --out.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders (runs/<experiment>/version_N) "
        "or experiment folders (their newest version)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--names", nargs="+", default=None, help="a label per run")
    opts = parser.parse_args(args)
    if opts.names is not None and len(opts.names) != len(opts.runs):
        parser.error(f"--names: give one per run ({len(opts.runs)}), got {len(opts.names)}")
    names = opts.names or [None] * len(opts.runs)
    try:
        runs = [read_run(path, name) for path, name in zip(opts.runs, names, strict=True)]
    except ValueError as exn:
        parser.error(str(exn))
    paths = write_curves(runs, opts.out)
    print(summary_table(runs))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")

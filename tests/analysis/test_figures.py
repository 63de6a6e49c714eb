"""The figures and tables of `analyze` read without the code: every axis labelled, both
thresholds drawn where they apply, legends off the data, words where a panel or a bar has no
value, LOST boxes inside the frame, every label inside the saved image, every empty table cell
explained."""

import re

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.patches import Rectangle
from PIL import Image

from lightning_registers.analysis.attention import draw_attention_side_by_side
from lightning_registers.analysis.figure_style import DPI, NA, NO_HIGH_NORM, save
from lightning_registers.analysis.lost import draw_lost
from lightning_registers.analysis.neighbours import draw_neighbour_similarity
from lightning_registers.analysis.norms import (
    draw_layer_statistics,
    draw_norm_distributions,
    layer_statistics,
)
from lightning_registers.analysis.probes import draw_probes
from lightning_registers.analysis.report import markdown
from lightning_registers.measures.figures import plt
from lightning_registers.measures.norms import OutlierRule

RULE = OutlierRule("relative", threshold=150.0, factor=3.0)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def with_artifacts(n=64, high=4, low=10.0, artifact=200.0):
    """Norms of ``n`` tokens, the last ``high`` of them far above the others."""
    return torch.cat([torch.full((n - high,), low), torch.full((high,), artifact)])


def texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def assert_legends_off_the_data(fig):
    fig.canvas.draw()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    for legend in legends:
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), legend.get_texts()[0].get_text()


def assert_saved_whole(fig, path):
    """Every text of ``fig`` lies inside the PNG that ``save`` writes."""
    fig.set_dpi(DPI)
    save(fig, path)  # closes the figure: drawn again on a canvas of its own, as saved
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    tight = fig.get_tightbbox(renderer)  # inches
    shown = list(fig.texts) + [t for legend in fig.legends for t in legend.get_texts()]
    for ax in fig.axes:
        shown += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        shown += ax.get_legend().get_texts() if ax.get_legend() else []
    for text in (t for t in shown if t.get_visible() and t.get_text()):
        box = text.get_window_extent(renderer).transformed(fig.dpi_scale_trans.inverted())
        assert tight.x0 - 1e-3 <= box.x0 and box.x1 <= tight.x1 + 1e-3, text.get_text()
        assert tight.y0 - 1e-3 <= box.y0 and box.y1 <= tight.y1 + 1e-3, text.get_text()
    with Image.open(path) as image:  # room for all of them (beyond the figure's own size)
        assert image.size[0] >= tight.width * DPI and image.size[1] >= tight.height * DPI


def test_norm_distribution_draws_both_thresholds_with_the_share_above_each(tmp_path):
    norms = {"artifacts": with_artifacts(), "clean": torch.full((64,), 8.0)}
    fig = draw_norm_distributions(norms, RULE, "output patch-token norms")
    for ax, median in zip(fig.axes, (10.0, 8.0), strict=True):
        cuts = sorted(line.get_xdata()[0] for line in ax.lines)
        assert cuts == pytest.approx(sorted([150.0, 3 * median]))
        assert "norm" in ax.get_xlabel() and "count" in ax.get_ylabel()
        # The histogram covers both thresholds and the data.
        low, high = ax.get_xlim()
        assert low < median and high > 150
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend[0].startswith("absolute threshold 150") and legend[0].endswith("6.25 % above")
    assert "3 x median = 30" in legend[1] and "(splits tokens)" in legend[1]
    assert legend[1].endswith("6.25 % above")
    clean = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert all(text.endswith("0.00 % above") for text in clean)
    assert_legends_off_the_data(fig)
    assert_saved_whole(fig, tmp_path / "norm_distribution.png")


def test_norms_by_layer_include_the_output_and_both_thresholds(tmp_path):
    norms = {
        "artifacts": {
            "block00": torch.full((64,), 5.0),
            "block01": with_artifacts(low=6.0, artifact=900.0),
            "output": with_artifacts(),
        },
        "clean": {layer: torch.full((64,), 8.0) for layer in ("block00", "block01", "output")},
    }
    stats = {name: layer_statistics(by_layer) for name, by_layer in norms.items()}
    fig = draw_layer_statistics(stats, RULE, "patch-token norms by layer")
    top, bottom = fig.axes[0], fig.axes[2]
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["block00", "block01", "output"]
    lines = [(list(line.get_xdata()), list(line.get_ydata())) for line in top.lines]
    assert any(x == [0, 1] and y == [150, 150] for x, y in lines)  # the absolute threshold
    medians = [stats["artifacts"][layer]["p50"] for layer in ("block00", "block01")]
    assert ([0, 1], [3 * m for m in medians]) in lines  # the relative one, per block
    assert ([1.7, 2.3], [30.0, 30.0]) in lines  # ... and at the output
    shares = {tuple(line.get_xdata()): list(line.get_ydata()) for line in bottom.lines}
    assert shares[(2,)] == [pytest.approx(6.25)]  # the output's high-norm share
    assert shares[(0, 1)] == [0, pytest.approx(6.25)]
    for ax in fig.axes:
        assert ax.get_ylabel()
    assert "output" in fig.get_supxlabel()
    clean_shares = fig.axes[3]
    assert f"{NO_HIGH_NORM} at any layer" in texts(clean_shares)
    assert NO_HIGH_NORM not in " ".join(texts(bottom))
    assert clean_shares.get_ylim()[0] == 0
    assert_legends_off_the_data(fig)
    assert_saved_whole(fig, tmp_path / "norms_by_layer.png")


def test_neighbour_similarity_plots_both_kinds_and_says_when_there_are_no_high_norm_tokens(
    tmp_path,
):
    similarity = torch.linspace(-0.5, 1.0, 100)
    results = {
        "artifacts": {"normal": similarity[:90], "high_norm": similarity[90:]},
        "clean": {"normal": similarity, "high_norm": similarity[:0]},
    }
    fig = draw_neighbour_similarity(results, RULE)
    both, clean = fig.axes
    legend = [t.get_text() for t in both.get_legend().get_texts()]
    assert legend[0].startswith("normal: 90 tokens") and legend[1].startswith("high-norm: 10")
    assert not texts(both)
    assert texts(clean) == [NO_HIGH_NORM]
    assert [t.get_text() for t in clean.get_legend().get_texts()][0].startswith("normal: 100")
    for ax in fig.axes:
        assert "cosine" in ax.get_xlabel() and "density" in ax.get_ylabel()
    assert "norm > 3 x median" in fig.get_suptitle()
    assert_legends_off_the_data(fig)
    assert_saved_whole(fig, tmp_path / "neighbour_similarity.png")


def probe_results(high_norm):
    def kinds(normal):
        return {"normal": normal, "high_norm": high_norm}

    return {
        "position": {"top1": kinds(0.5), "distance": kinds(0.00367)},
        "pixels": {"l2": kinds(5.0)},
        "classification": None
        if high_norm is None
        else {k: {"accuracy": 0.25, "test_images": 4} for k in ("cls", "normal", "high_norm")},
    }


def test_probes_write_n_a_where_a_value_is_missing(tmp_path):
    fig = draw_probes({"artifacts": probe_results(0.75), "clean": probe_results(None)})
    width = 0.4
    position, distance, pixels, classes = fig.axes[:4]
    for ax in (position, distance, pixels):
        (missing,) = [t for t in ax.texts if t.get_text() == NA]
        assert missing.get_position()[0] == pytest.approx(1 + width)  # the clean high-norm bar
        assert ax.get_ylabel() and ax.get_xlabel()
    # Without labels the class probe has no value at all: n/a at each of the clean bars.
    assert [t.get_position()[0] for t in classes.texts if t.get_text() == NA] == pytest.approx(
        [width, 1 + width, 2 + width]
    )
    assert "0.00367" in texts(distance)  # a value near 0 is labelled, not taken for missing
    assert position.get_ylim()[1] >= 100 and "%" in position.get_ylabel()
    assert any(NA in t.get_text() for t in fig.texts)  # the n/a is explained
    assert_legends_off_the_data(fig)
    assert_saved_whole(fig, tmp_path / "probes.png")


def test_probes_without_missing_values_write_no_n_a():
    fig = draw_probes({"artifacts": probe_results(0.75)})
    assert not any(NA in text for ax in fig.axes for text in texts(ax))
    assert not any(NA in text.get_text() for text in fig.texts)


def test_lost_boxes_on_the_image_edge_stay_inside_the_frame(tmp_path):
    images = torch.rand(2, 3, 32, 32)
    whole = torch.tensor([0.0, 0.0, 32.0, 32.0])
    truth = [whole[None], torch.zeros(0, 4)]
    boxes = torch.stack([whole, torch.tensor([4.0, 8.0, 20.0, 16.0])])
    name = "a checkpoint name far longer than one row of images"
    fig = draw_lost({name: (images, truth, boxes)}, n=2)
    for ax in fig.axes:
        (left, right), (bottom, top) = ax.get_xlim(), ax.get_ylim()  # the image's edges
        spines = max(spine.get_zorder() for spine in ax.spines.values())
        rectangles = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert rectangles
        for rectangle in rectangles:
            x0, y0 = rectangle.get_xy()
            x1, y1 = x0 + rectangle.get_width(), y0 + rectangle.get_height()
            assert left < x0 < x1 < right and top < y0 < y1 < bottom
            assert rectangle.get_zorder() > spines
    # The whole-image boxes (LOST's and the truth) run along the edge, a line width inside.
    first = fig.axes[0]
    side = first.get_xlim()[1] - first.get_xlim()[0]
    for rectangle in first.patches:
        assert rectangle.get_width() > 0.95 * side
    assert first.get_title() == "IoU 1.00" and fig.axes[1].get_title() == "no box"
    label = first.yaxis.label
    assert label.get_rotation() == 0 and "\n" in label.get_text()
    assert_legends_off_the_data(fig)
    assert_saved_whole(fig, tmp_path / "lost.png")


def test_attention_panels_keep_their_titles_in_the_image(tmp_path):
    attention = torch.rand(2, 3, 1, 4, 4)
    maps = {"attention": attention, "queries": ["cls"]}
    images = torch.rand(2, 3, 32, 32)
    names = ["a checkpoint", "a checkpoint + test-time register"]
    fig = draw_attention_side_by_side({name: (maps, images) for name in names})
    assert [ax.get_title() for ax in fig.axes] == [
        f"{name}: last-block attention, head mean" for name in names
    ]
    assert fig.get_supxlabel() == "a row per image"
    assert_saved_whole(fig, tmp_path / "attention.png")


def model_summary(high_norm: bool, labels: bool = True) -> dict:
    """A model's part of ``summary.json`` as ``report.model_summary`` writes it: with
    high-norm tokens and register neurons, or none of either."""
    share = 0.05 if high_norm else 0.0
    value = 0.5 if high_norm else None
    norms = {"high_norm_share_absolute": share, "high_norm_share_relative": share}
    search = {"family": None, "rule": "relative", "factor": 3.0, "layer": 3, "top_layer": 3}
    search |= {"top_k": 10, "tokens": "patches", "average": "pooled", "sparsity": False}
    classes = {k: {"accuracy": 0.25, "test_images": 4} for k in ("cls", "normal")}
    classes["high_norm"] = {"accuracy": value, "test_images": 4 if high_norm else 0}
    summary = {
        "backbone": {"num_registers": 0},
        "norms": {
            "output": norms | {"p50": 10.0, "max": 200.0 if high_norm else 11.0},
            "first_high_norm_block": {"relative": "block01" if high_norm else None},
        },
        "neighbour_similarity": {"high_norm": value, "normal": 0.8},
        "probes": {
            "position": {
                "top1": {"high_norm": value, "normal": 0.9},
                "distance": {"high_norm": value, "normal": 0.1},
            },
            "pixels": {"l2": {"high_norm": value, "normal": 5.0}},
            "classification": classes if labels else None,
        },
        "attention_on_high_norm": {"cls": share, "share_of_patches": share},
        "lost": {"corloc": 0.5, "corloc_centred": 0.2, "evaluated": 16, "k": None},
        "test_time_registers": {"search": search | {"values": "neuron_max"}, "neurons": []},
    }
    if high_norm:
        summary["test_time_registers"] |= {
            "neurons": [{"block": 1, "neuron": 5, "score": 9.0}],
            "after": {
                "norms": {"output": {k: 0.0 for k in norms}},
                "attention_on_high_norm": {"cls": 0.01},
                "lost": {"corloc": 0.5},
            },
            "normal_token_cosine": 0.999,
        }
    return summary


def analysis_summary(models: dict) -> dict:
    protocol = {"name": "ours", "lost_input": "square", "lost_ties": "stable"}
    protocol |= {"corloc_over": "boxed", "no_hard": False, "ttr_values": "neuron_max"}
    protocol |= {"ttr_tokens": "patches", "ttr_average": "pooled", "ttr_sparsity": False}
    return {
        "images": {"source": "x", "count": 16, "skipped": 0, "with_labels": 16, "with_boxes": 16},
        "protocol": protocol,
        "settings": {"rule": "relative", "threshold": 150.0, "factor": 3.0},
        "models": models,
        "figures": [],
    }


MARK = re.compile(r"–([⁰¹²³⁴⁵⁶⁷⁸⁹]*)")


def tables(text: str) -> list[tuple[list[list[str]], dict[str, str]]]:
    """Each table of ``text``: its rows (cells) and the reason under it for each mark of an
    empty cell, asserting that every empty cell has a mark and every mark a reason."""
    blocks = text.split("\n\n")
    out = []
    for i, block in enumerate(blocks):
        lines = [line for line in block.splitlines() if line.startswith("| ")]
        if not lines:
            continue
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
        marks = {mark for line in lines for mark in MARK.findall(line)}
        assert "" not in marks, "an empty cell without its reason"
        notes = blocks[i + 1].splitlines() if marks else []
        reasons = dict(re.fullmatch(r"- –(\S+): (.+)", line).groups() for line in notes)
        assert marks == set(reasons), (marks, reasons)
        out.append((rows, reasons))
    return out


def test_summary_explains_every_empty_cell():
    models = {"artifacts": model_summary(True), "clean": model_summary(False)}
    text = markdown(analysis_summary(models))
    (main_rows, main), (ttr_rows, ttr) = tables(text)
    assert sorted(main.values()) == [
        "no block has 0.5 % of its patch tokens above 3 x its median norm.",
        "no high-norm output patch tokens (norm > 3 x median).",
        "no high-norm token among the probes' test images (norm > 3 x median).",
        "no test image has a high-norm token (norm > 3 x median).",
    ]
    assert list(ttr.values()) == [
        "not run: no register neurons to move, as none of the patch tokens is above 3 x median "
        "after block 3."
    ]
    # The model with artifacts has no empty cell; before is kept where after is missing.
    assert not any("–" in row[1] for row in main_rows + ttr_rows)
    assert ["LOST CorLoc (%)", "50.00 → 50.00", "50.00 → –¹"] in ttr_rows
    assert ["output high-norm share, relative (%)", "5.00 → 0.00", "0.00 → –¹"] in ttr_rows


def test_summary_names_missing_labels_and_boxes():
    models = {"unlabelled": model_summary(False, labels=False)}
    unlabelled = models["unlabelled"]
    unlabelled["lost"] |= {"corloc": None, "corloc_centred": None}
    unlabelled["test_time_registers"]["search"] = {
        **unlabelled["test_time_registers"]["search"],
        "tokens": "all",
        "threshold": 30.0,
        "layer": 10,
    }
    del unlabelled["test_time_registers"]["search"]["factor"]
    (_, main), (_, ttr) = tables(markdown(analysis_summary(models)))
    assert "not run: the class probe needs labels of at least two classes." in main.values()
    assert "no image with a ground-truth box to score." in main.values()
    assert sorted(ttr.values()) == [
        "no image with a ground-truth box to score.",
        "not run: no register neurons to move, as none of the tokens is above 30 after block 10.",
    ]

"""The Artifacts dashboard read back from the event files: the custom-scalars layout charts
exactly the tags logged, the layer last and shares in percent, a status text at every check,
and norm and attention maps drawn on scales that a flat map cannot fool."""

import re

import matplotlib
import pytest
import torch
from analysis.planted import GRID
from planted_runs import MAX_STEPS, accumulator, fit_demo, tiny_backbone
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from lightning_registers.analysis.curves import read_run
from lightning_registers.callbacks import TokenNormMonitor
from lightning_registers.measures.attention import attention_grids
from lightning_registers.measures.figures import norm_map_grid

LAYERS = ("block00", "block01", "block02", "block03", "output")
KEYS = {
    "high_norm_share_relative",
    "high_norm_share_absolute",
    "max_over_median",
    "onset_block",
    "image_share_max",
    "background_share",
    "neighbour_cosine_high_norm",
    "neighbour_cosine_normal",
    "cls_attention_on_high_norm",
}


def layout(events) -> layout_pb2.Layout:
    (config,) = events.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])


def charted(chart, tags) -> set[str]:
    """The tags a multi-line chart draws, matched as TensorBoard's custom-scalars plugin does."""
    return {tag for pattern in chart.multiline.tag for tag in tags if re.match(pattern, tag)}


def statuses(events, name="backbone") -> dict[int, str]:
    texts = events.Tensors(f"artifacts/{name}/status/text_summary")
    return {t.step: t.tensor_proto.string_val[0].decode() for t in texts}


def test_the_layout_charts_every_layer_of_the_logged_tags(switched_on_runs):
    events = accumulator(switched_on_runs["artifacts"])
    tags = set(events.Tags()["scalars"])
    (category,) = layout(events).category
    assert category.title == "Artifacts"
    charts = {chart.title: charted(chart, tags) for chart in category.chart}

    def lines(key):
        return {f"artifacts/backbone/{key}/{layer}" for layer in LAYERS}

    assert charts == {
        "backbone: high-norm patch tokens (%), norm > 3 x median": lines(
            "high_norm_share_relative"
        ),
        "backbone: high-norm patch tokens (%), norm > 150": lines("high_norm_share_absolute"),
        "backbone: max / median patch-token norm": lines("max_over_median"),
        "backbone: artifacts present (1) or not (0)": {"artifacts/backbone/present"},
    }
    assert set().union(*charts.values()) <= tags
    artifacts = [tag.split("/") for tag in tags if tag.startswith("artifacts/")]
    assert {parts[-1] for parts in artifacts if len(parts) == 4} == set(LAYERS)
    assert {parts[2] for parts in artifacts if len(parts) == 4} == KEYS
    assert [parts for parts in artifacts if len(parts) != 4] == [
        ["artifacts", "backbone", "present"]
    ]


def test_shares_are_logged_in_percent_and_read_back_as_fractions(switched_on_runs):
    events = accumulator(switched_on_runs["artifacts"])
    planted = 3 / GRID**2
    for key in ("high_norm_share_relative", "image_share_max"):
        last = events.Scalars(f"artifacts/backbone/{key}/block01")[-1]
        assert last.value == pytest.approx(100 * planted), key
    assert events.Scalars("artifacts/backbone/background_share/block01")[-1].value == 100
    run = read_run(switched_on_runs["artifacts"])
    assert run.layers["backbone"]["block01"]["image_share_max"][-1][1] == pytest.approx(planted)
    onset = run.layers["backbone"]["block01"]["onset_block"][-1][1]
    assert onset == events.Scalars("artifacts/backbone/onset_block/block01")[-1].value == 1


def test_runs_logged_with_the_layer_before_the_key_are_read_and_joined_to_a_resumed_part(
    tmp_path,
):
    with SummaryWriter(tmp_path) as writer:
        for step in (0, 5):
            writer.add_scalar("artifacts/backbone/block01/high_norm_share_relative", 0.02, step)
            writer.add_scalar("artifacts/backbone/output/max_over_median", 7.0, step)
            writer.add_scalar("artifacts/backbone/present", 1.0, step)
    run = read_run(tmp_path)
    assert run.layers["backbone"]["block01"]["high_norm_share_relative"] == [
        (0, pytest.approx(0.02)),
        (5, pytest.approx(0.02)),
    ]
    assert run.layers["backbone"]["output"]["max_over_median"][-1] == (5, 7.0)
    assert run.present["backbone"] == [(0, 1.0), (5, 1.0)]

    # Resumed at step 10 with the layer-last tags and shares in percent: one series each.
    with SummaryWriter(tmp_path) as writer:
        writer.add_scalar("artifacts/backbone/high_norm_share_relative/block01", 3.0, 10)
        writer.add_scalar("artifacts/backbone/present", 0.0, 10)
    run = read_run(tmp_path)
    shares = run.layers["backbone"]["block01"]["high_norm_share_relative"]
    assert [step for step, _ in shares] == [0, 5, 10]
    assert [value for _, value in shares] == pytest.approx([0.02, 0.02, 0.03])
    assert run.present["backbone"] == [(0, 1.0), (5, 1.0), (10, 0.0)]


def test_a_status_text_at_every_check_says_what_the_check_found(switched_on_runs):
    """Planted tokens switch on after step 4 (4.69 % of the patches) and count as artifacts
    from block 1 on the background; the look-alikes, from block 0 on the object, never do."""
    checks = range(0, MAX_STEPS + 1, 2)
    artifacts = statuses(accumulator(switched_on_runs["artifacts"]))
    assert list(artifacts) == list(checks)
    assert all(text.endswith(f"backbone, step {step}") for step, text in artifacts.items())
    assert artifacts[2].startswith("no artifacts: largest share 0 % at output (norm > 3 x median)")
    assert artifacts[4].startswith("no artifacts yet (like artifacts at block01 for 1 of 2")
    assert "largest share 4.69 % at output" in artifacts[4]
    assert artifacts[6].startswith("artifacts present at block01 since step 6: ")
    look_alikes = statuses(accumulator(switched_on_runs["look_alikes"]))
    assert list(look_alikes) == list(checks)
    assert look_alikes[12].startswith(
        "no artifacts (at output: from the first blocks on, on objects): largest share 4.69 %"
    )


def test_a_monitor_alone_charts_its_watched_layers_and_says_whether_tokens_are_high(
    tmp_path, demo_shards
):
    monitor = TokenNormMonitor(every_n_steps=2, layers=[-1], rule="absolute")
    trainer = fit_demo(tmp_path, demo_shards, tiny_backbone(), [monitor], max_steps=2)
    events = accumulator(trainer.log_dir)
    (category,) = layout(events).category
    tags = set(events.Tags()["scalars"])
    assert {chart.title: charted(chart, tags) for chart in category.chart} == {
        f"backbone: {title}": {f"artifacts/backbone/{key}/{layer}" for layer in LAYERS[1::3]}
        for title, key in (
            ("high-norm patch tokens (%), norm > 150", "high_norm_share_absolute"),
            ("high-norm patch tokens (%), norm > 3 x median", "high_norm_share_relative"),
            ("max / median patch-token norm", "max_over_median"),
        )
    }
    texts = statuses(events)
    assert list(texts) == [0, 2]
    # Random weights: no norm reaches 150.
    assert texts[2].startswith("no artifacts: largest share 0 % at output (norm > 150)")


def cell(image: torch.Tensor, row: int, column: int, side: int = 96) -> torch.Tensor:
    """The pixels (3, side, side) of one map of a ``labelled_grid`` whose image column is
    black: the first pixel row below the titles that is not white is the grid's first row."""
    top = next(y for y in range(image.shape[1]) if (image[:, y, 3] < 0.99).all())
    y, x = top + row * (side + 2), 2 + column * (side + 2)
    return image[:, y : y + side, x : x + side]


def test_a_nearly_flat_layer_is_one_even_dark_colour_beside_an_outlier():
    """Norms 13.79..13.92 (under 1 % apart) drawn relative to their median: one colour, near
    that of the median, while the other layer's outlier takes the top of the scale."""
    torch.manual_seed(0)
    black = torch.zeros(2, 3, 32, 32)
    flat = 13.79 + 0.13 * torch.rand(6, 16)
    flat[0, :2] = torch.tensor([13.79, 13.92])
    spiky = 10 + torch.rand(6, 16)
    spiky[:, 5] = 100.0
    image = norm_map_grid(black, {"block01": flat, "output": spiky}, (4, 4), factor=3.0)
    inferno = matplotlib.colormaps["inferno"]
    ratio = spiky[:2, 5].max() / spiky.median()
    for row in range(2):
        flat_map = cell(image, row, 1)
        spread = flat_map.flatten(1).amax(1) - flat_map.flatten(1).amin(1)
        assert spread.max() < 0.02
        median_colour = torch.tensor(inferno(1 / ratio.item())[:3], dtype=torch.float32)
        torch.testing.assert_close(flat_map.mean((1, 2)), median_colour, atol=0.02, rtol=0)
        outlier = cell(image, row, 2)[:, 24:48, 24:48].mean((1, 2))  # patch 5: row 1, col 1
        torch.testing.assert_close(
            outlier, torch.tensor(inferno(1.0)[:3], dtype=torch.float32), atol=0.01, rtol=0
        )
    assert image.shape[-1] > 3 * 98 + 2 + 20  # the colour bar beside the grid


def test_attention_grids_show_the_image_and_uniform_attention_as_one_dark_colour():
    images = torch.zeros(2, 3, 32, 32)
    uniform = torch.full((2, 3, 2, 4, 4), 1 / 20)  # 2 images, 3 heads, [CLS] and a register
    grids = attention_grids(uniform, ["cls", "reg0"], images, labelled=True)
    assert sorted(grids) == ["heads_cls", "heads_reg0", "mean"]
    assert grids["heads_reg0"][1] == ["image", "head 0", "head 1", "head 2"]
    assert grids["mean"][1] == ["image", "cls", "reg0"]
    half = torch.tensor(
        matplotlib.colormaps["inferno"](0.5)[:3], dtype=torch.float32
    )  # 1 (uniform) of 0..2
    image = grids["heads_reg0"][0]
    for column in range(1, 4):
        torch.testing.assert_close(cell(image, 1, column).mean((1, 2)), half, atol=0.01, rtol=0)
    assert (cell(image, 1, 0) == 0).all()  # the (black) image itself

"""A short monitored run seen through a real TensorBoard: its data endpoints serve our tags,
and its scalars, custom-scalars (the Artifacts dashboard), histograms, images and text
dashboards render in headless Chromium without TensorBoard's "no data" pages."""

import io
import re

import pytest
from chromium import Chromium, chromium_executable
from PIL import Image, ImageStat
from tensorboard_server import CHECKS, LAYERS, RUN, monitored_run, tensorboard

SHARE = "artifacts/backbone/high_norm_share_relative/output"
CHARTS = {
    "backbone: high-norm patch tokens (%), norm > 3 x median": "high_norm_share_relative",
    "backbone: high-norm patch tokens (%), norm > 150": "high_norm_share_absolute",
    "backbone: max / median patch-token norm": "max_over_median",
}
STATE = "backbone: artifacts present (1) or not (0)"
STATUS = "artifacts/backbone/status/text_summary"
IMAGES = {"norm_maps/backbone", "attention/backbone/mean", "attention/backbone/heads_cls"}
ERRORS = (
    "No dashboards are active",
    "data was found",  # "No scalar data was found." and the like
    "dashboard is inactive",  # the custom-scalars dashboard without a layout
    "Probable causes",
    "Data could not be loaded",
    "Failed to fetch",
    "Invalid regex",
)
WIDTH, HEIGHT = 1400, 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_shards):
    root = monitored_run(tmp_path_factory.mktemp("runs"), demo_shards)
    with tensorboard(root, SHARE) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with Chromium(chromium_executable(), WIDTH, HEIGHT) as browser:
        yield browser


def test_tensorboard_serves_the_monitors_tags(server):
    assert server.json("/data/runs") == [RUN]
    scalars = server.json("/data/plugin/scalars/tags")[RUN]
    for key in (*CHARTS.values(), "neighbour_cosine_normal"):
        assert {f"artifacts/backbone/{key}/{layer}" for layer in LAYERS} <= set(scalars), key
    points = server.json("/data/plugin/scalars/scalars", run=RUN, tag=SHARE)
    assert [step for _, step, _ in points] == CHECKS
    assert all(0 <= value <= 100 for _, _, value in points)

    (category,) = server.json("/data/plugin/custom_scalars/layout")["category"]
    assert category["title"] == "Artifacts"
    charts = {chart["title"]: chart["multiline"]["tag"] for chart in category["chart"]}
    assert set(charts) == {*CHARTS, STATE}
    for title, patterns in charts.items():
        key = CHARTS.get(title)
        expected = {f"artifacts/backbone/{key}/{layer}" for layer in LAYERS} if key else None
        (pattern,) = patterns
        served = server.json("/data/plugin/custom_scalars/scalars", run=RUN, tag=pattern)
        assert served["regex_valid"], title
        lines = served["tag_to_events"]
        assert set(lines) == (expected or {"artifacts/backbone/present"}), title
        assert all([step for _, step, _ in line] == CHECKS for line in lines.values()), title

    histograms = server.json("/data/plugin/histograms/tags")[RUN]
    assert {f"token_norms/backbone/{layer}/patches" for layer in LAYERS} <= set(histograms)
    served = server.json(
        "/data/plugin/histograms/histograms", run=RUN, tag="token_norms/backbone/output/patches"
    )
    assert [step for _, step, _ in served] == CHECKS

    assert IMAGES <= set(server.json("/data/plugin/images/tags")[RUN])
    samples = server.json("/data/plugin/images/images", run=RUN, tag="norm_maps/backbone")
    assert [sample["step"] for sample in samples] == CHECKS
    png = server.get(f"/data/plugin/images/individualImage?{samples[-1]['query']}")
    width, height = Image.open(io.BytesIO(png)).size
    side = 96 + 2  # 32 px images drawn at 3x, and the grid's padding
    assert width > 3 * side + 2 + 20 and height > 2 * side + 2 + 40  # colour bar, titles

    assert STATUS in server.json("/data/plugin/text/tags")[RUN]
    texts = server.json("/data/plugin/text/text", run=RUN, tag=STATUS)
    assert [text["step"] for text in texts] == CHECKS
    assert all(re.search(r"largest share [\d.]+ % at \w+", text["text"]) for text in texts)


@pytest.mark.parametrize(
    "dashboard, expected",
    [
        ("scalars", ["artifacts", "artifacts/backbone/high_norm_share_absolute/block00"]),
        ("custom_scalars", ["Artifacts", *CHARTS, STATE, "Matches (3)", "Matches (1)"]),
        ("histograms", ["token_norms", "token_norms/backbone/block00/cls"]),
        ("images", ["norm_maps/backbone", "attention/backbone/heads_cls"]),
        ("text", [STATUS, "largest share"]),
    ],
)
def test_each_dashboard_renders_our_data_in_chromium(
    server, browser, dashboard, expected, tmp_path
):
    browser.open(f"{server.url}/#{dashboard}")
    text = browser.wait_for(expected)
    assert not [error for error in ERRORS if error in text], text[:2000]
    shot = Image.open(browser.screenshot(tmp_path / f"{dashboard}.png")).convert("RGB")
    assert shot.size == (WIDTH, HEIGHT)
    colours = shot.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, dashboard
    assert max(ImageStat.Stat(shot).stddev) > 20, dashboard

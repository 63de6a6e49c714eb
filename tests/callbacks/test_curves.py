"""``lightning-registers curves`` on runs whose planted tokens switch on at a known step: the
curves, the events and the figure's marks are read back where they must be."""

import csv
import json
import shutil

import pytest
from analysis.planted import GRID
from PIL import Image
from planted_runs import MAX_STEPS, SWITCH_STEP

from lightning_registers.analysis.curves import curves_figure, read_run
from lightning_registers.cli import main

SHARE = "high_norm_share_relative"


def test_curves_command_writes_the_curves_and_events_of_every_run(
    switched_on_runs, tmp_path, capsys
):
    runs = [switched_on_runs["artifacts"], switched_on_runs["look_alikes"]]
    main(["curves", *map(str, runs), "--out", str(tmp_path / "out"), "--names", "art", "look"])
    printed = capsys.readouterr().out
    assert "| art | backbone | 12 | 4.69% (block01, step 4) |" in printed
    assert "| look | backbone | 12 | 4.69% (block00, step 4) |" in printed

    with open(tmp_path / "out" / "curves.csv") as f:
        table = list(csv.DictReader(f))
    for run, first_layer in (("art", 1), ("look", 0)):
        for layer in ("block00", "block01", "block03", "output"):
            points = [
                (int(r["step"]), float(r["value"]))
                for r in table
                if (r["run"], r["layer"], r["key"]) == (run, layer, SHARE)
            ]
            index = 4 if layer == "output" else int(layer.removeprefix("block"))
            planted = 3 / GRID**2 if index >= first_layer else 0.0
            expected = [
                (step, pytest.approx(planted if step >= SWITCH_STEP else 0.0))
                for step in range(0, MAX_STEPS + 1, 2)
            ]
            assert points == expected, (run, layer)

    document = json.loads((tmp_path / "out" / "curves.json").read_text())
    art, look = document["runs"]
    assert [(e["event"], e["step"], e["layer"]) for e in art["events"]] == [
        ("emerged", 6, "block01")
    ]
    assert look["events"] == []
    assert art["present"]["backbone"] == [[s, float(s >= 6)] for s in range(0, 13, 2)]
    assert art["layers"]["backbone"]["block02"]["onset_block"][0] == [SWITCH_STEP, 1.0]
    assert art["summary"]["backbone"]["largest"][SHARE]["layer"] == "block01"
    width, height = Image.open(tmp_path / "out" / "curves.png").size
    assert width > height > 300  # two runs side by side, two rows


def test_the_figure_marks_each_event_at_its_step(switched_on_runs):
    runs = [read_run(switched_on_runs[name]) for name in ("artifacts", "look_alikes")]
    figure = curves_figure(runs)
    panels = figure.axes[:4]  # 2 rows x 2 columns, row-major; then nothing but the legend
    marks = [
        [tuple(line.get_xdata()) for line in ax.lines if line.get_linestyle() == "--"]
        for ax in panels
    ]
    assert marks == [[(6, 6)], [], [(6, 6)], []]
    assert all(len(ax.lines) - len(m) == 5 for ax, m in zip(panels, marks, strict=True))


def test_events_are_read_from_the_text_events_without_the_events_file(switched_on_runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(switched_on_runs["artifacts"], copy)
    (copy / "artifact_events.jsonl").unlink()
    run = read_run(copy)
    assert run.events == [
        {"event": "emerged", "step": 6, "backbone": "backbone", "layer": "block01"}
    ]


def test_bad_run_folders_fail_with_a_clear_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["curves", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert "has no TensorBoard event files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["curves", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

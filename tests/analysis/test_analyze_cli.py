"""`lightning-registers analyze`: figures, summary.json and summary.md for several checkpoints,
on shards and on a folder of images with Pascal-VOC boxes."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from planted import GRID, PLANTED, planted_backbone

from lightning_registers.cli import main
from lightning_registers.data import generate_scene, write_demo_shards

SCENES = 40


def save_backbone(model, path):
    torch.save({"config": model.config.as_kwargs(), "state_dict": model.state_dict()}, path)
    return path


def write_voc_folder(root, count):
    """The demo validation scenes as PNG files with VOC annotations (1-based, inclusive)."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for index in range(count):
        image, _, _, meta = generate_scene(0, "val", index, 64)
        name = f"val-{index:08d}"
        image.save(root / "JPEGImages" / f"{name}.png")
        objects = "".join(
            f"<object><name>{o['class']}</name><bndbox><xmin>{o['box'][0] + 1}</xmin>"
            f"<ymin>{o['box'][1] + 1}</ymin><xmax>{o['box'][2]}</xmax><ymax>{o['box'][3]}</ymax>"
            "</bndbox></object>"
            for o in meta["objects"]
        )
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.png</filename>{objects}</annotation>"
        )
    (root / "JPEGImages" / "zz-broken.png").write_bytes(b"not a png")
    (root / "SegmentationClass").mkdir()  # VOC's masks are PNGs too, and not inputs
    image.save(root / "SegmentationClass" / "val-00000000.png")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return (
        save_backbone(planted_backbone(), root / "planted.pt"),
        save_backbone(planted_backbone(plant=False), root / "clean.pt"),
    )


def test_analyze_compares_checkpoints_on_shards_and_on_a_voc_folder(tmp_path, checkpoints):
    planted, clean = checkpoints
    write_demo_shards(
        tmp_path / "shards", train=0, val=SCENES, size=64, seed=0, maxcount=20, progress=False
    )
    write_voc_folder(tmp_path / "voc", SCENES)
    common = ["--checkpoint", str(planted), "--compare", str(clean), "--batch-size", "16"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_registers.cli",
            "analyze",
            *common,
            "--images",
            str(tmp_path / "voc"),
            "--out",
            str(tmp_path / "voc_out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "analyze" in done.stderr  # the progress bar
    main(
        [
            "analyze",
            *common,
            "--images",
            str(tmp_path / "shards/val/*.tar"),
            "--out",
            str(tmp_path / "shard_out"),
            "--quiet",
        ]
    )

    from_folder = json.loads((tmp_path / "voc_out" / "summary.json").read_text())
    from_shards = json.loads((tmp_path / "shard_out" / "summary.json").read_text())
    assert from_folder["images"] == {
        "source": str(tmp_path / "voc"),
        "count": SCENES,
        "skipped": 1,
        "with_labels": 0,
        "with_boxes": SCENES,
    }
    assert from_shards["images"]["with_labels"] == SCENES
    assert list(from_shards["models"]) == ["planted", "clean"]

    share = len(PLANTED) / GRID**2
    for summary in (from_folder, from_shards):
        planted_result, clean_result = summary["models"]["planted"], summary["models"]["clean"]
        assert planted_result["norms"]["output"]["high_norm_share_absolute"] == pytest.approx(share)
        assert planted_result["norms"]["first_high_norm_block"]["absolute"] == "block01"
        assert clean_result["norms"]["output"]["high_norm_share_relative"] == 0
        ttr = planted_result["test_time_registers"]
        assert (ttr["neurons"][0]["block"], ttr["neurons"][0]["neuron"]) == (1, 5)
        assert ttr["after"]["norms"]["output"]["high_norm_share_relative"] < 0.005
        assert ttr["normal_token_cosine"] > 0.999
        assert clean_result["test_time_registers"]["neurons"] == []
        assert summary["protocol"]["name"] == "ours"
        lost = clean_result["lost"]
        assert lost["evaluated"] == SCENES and 0 <= lost["corloc"] <= 1
    # The same scenes and boxes through VOC annotations and through shard metadata.
    for name in ("planted", "clean"):
        assert from_folder["models"][name]["lost"] == from_shards["models"][name]["lost"]
    assert from_folder["models"]["planted"]["probes"]["classification"] is None
    assert (
        from_shards["models"]["planted"]["probes"]["classification"]["cls"]["accuracy"] is not None
    )

    markdown = (tmp_path / "shard_out" / "summary.md").read_text()
    assert "| measure | planted | clean |" in markdown and "LOST CorLoc" in markdown
    for figure in from_shards["figures"]:
        assert f"({figure})" in markdown
        with Image.open(tmp_path / "shard_out" / figure) as image:
            assert image.size[0] > 100
    assert "test_time_registers.png" in from_shards["figures"]
    assert "attention_mean_planted_test-time_register.png" in from_shards["figures"]


def test_analyze_records_the_reference_protocol(tmp_path, checkpoints):
    write_voc_folder(tmp_path / "voc", 8)
    out = tmp_path / "out"
    main(
        ["analyze", "--checkpoint", str(checkpoints[0]), "--images", str(tmp_path / "voc")]
        + ["--out", str(out), "--protocol", "reference", "--quiet"]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == {
        "name": "reference",
        "ttr_values": "sign_max",
        "ttr_tokens": "all",
        "ttr_average": "per_image",
        "ttr_sparsity": True,
        "lost_input": "padded",
        "lost_ties": "reference",
        "corloc_over": "all",
        "no_hard": False,
        "iou_eps": 1e-7,
    }
    planted = summary["models"]["planted"]
    assert planted["lost"]["k"] == 100 and planted["lost"]["evaluated"] == 8
    ttr = planted["test_time_registers"]
    # Not a family of the reference's table: the relative rule on all tokens, capped at the
    # first block with high-norm patches.
    assert ttr["search"] == {
        "family": None,
        "rule": "relative",
        "factor": 3.0,
        "layer": 3,
        "top_layer": 1,
        "top_k": 10,
        "tokens": "all",
        "average": "per_image",
        "sparsity": True,
        "values": "sign_max",
    }
    assert (ttr["neurons"][0]["block"], ttr["neurons"][0]["neuron"]) == (1, 5)
    assert ttr["after"]["norms"]["output"]["high_norm_share_relative"] < 0.005
    assert "Protocol: **reference**" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    "checkpoint, more, message",
    [
        ("nothing.ckpt", [], "nothing.ckpt does not exist"),
        (
            "planted",
            ["--compare", "clean", "--format", "ours", "timm", "dinov2"],
            "give one format or 2",
        ),
        ("other.pth", ["--format", "timm"], "not a timm ViT state dict"),
        ("planted", ["--images", "none-*.tar"], "matches no file"),
        ("planted", ["--lost-k", "0"], "lost_k must be at least 1"),
    ],
)
def test_analyze_refuses_bad_input_before_any_work(
    tmp_path, checkpoints, capsys, checkpoint, more, message
):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    files = {"planted": str(checkpoints[0]), "clean": str(checkpoints[1])}
    argv = ["analyze", "--checkpoint", files.get(checkpoint, str(tmp_path / checkpoint))]
    argv += [files.get(a, a) for a in more] + ["--out", str(tmp_path / "out")]
    if "--images" not in more:
        argv += ["--images", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

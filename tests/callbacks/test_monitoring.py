"""Monitoring callbacks: planted high-norm tokens read back from TensorBoard event files."""

import json
import random

import numpy as np
import pytest
import torch
from analysis.planted import GRID
from lightning.pytorch.callbacks import LambdaCallback
from PIL import Image
from planted_runs import REGISTERS, accumulator, fit_demo, tiny_backbone
from timm.layers import DropPath

from lightning_registers.callbacks import (
    ArtifactEmergence,
    AttentionMapMonitor,
    TokenNormMonitor,
    probing,
)
from lightning_registers.measures import high_norm_stats, token_norms
from lightning_registers.measures.figures import BAR, FONT_SIZE
from lightning_registers.measures.signature import SIGNATURE_KEYS
from lightning_registers.models import RegisterViT

PLANTED = [2, 9]  # patch indices (of 16) that get a huge norm in every image


def planted_backbone() -> RegisterViT:
    """A backbone edited so that patches PLANTED carry 1000 on channel 0 through every block
    while no other token has anything there; the final norm amplifies channel 0."""
    model = tiny_backbone()
    with torch.no_grad():
        model.patch_embed.proj.weight[0] = 0
        model.patch_embed.proj.bias[0] = 0
        model.pos_embed[0, :, 0] = 0
        model.pos_embed[0, [1 + i for i in PLANTED], 0] = 1000.0
        for block in model.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight[0] = 0
                layer.bias[0] = 0
        model.norm.weight[0] = 40.0
        model.norm.bias.zero_()
    return model


def monitors(**emergence):
    return [
        TokenNormMonitor(
            every_n_steps=2, probe_size=8, n_images=3, map_layers=["block01", "output"]
        ),
        AttentionMapMonitor(every_n_steps=2, n_images=3),
        ArtifactEmergence(patience=2, **emergence),
    ]


def test_token_norms_match_the_backbone_outputs():
    model = tiny_backbone().eval()
    images = torch.randn(3, 3, 32, 40)
    with torch.no_grad():
        norms = token_norms(model, images, [0, -1])
        features = model.forward_features(images)
    assert list(norms) == ["block00", "block01", "output"]
    torch.testing.assert_close(
        norms["output"]["patches"], features["x_norm_patchtokens"].norm(dim=-1)
    )
    torch.testing.assert_close(
        norms["output"]["registers"], features["x_norm_regtokens"].norm(dim=-1)
    )
    torch.testing.assert_close(norms["block01"]["cls"], features["x_prenorm"][:, 0].norm(dim=-1))
    assert norms["block00"]["patches"].shape == (3, 4 * 5)


def test_high_norm_stats_by_hand():
    stats = high_norm_stats(torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 200.0]]), 150.0, 3.0)
    assert stats["high_norm_share_absolute"] == pytest.approx(1 / 6)
    # torch's median of an even count is the lower middle value: 3, so the rule is norm > 9.
    assert stats["high_norm_share_relative"] == pytest.approx(2 / 6)
    assert stats["max_over_median"] == pytest.approx(200 / 3)


def check(share=0.0, onset_block=2, background_share=0.9, layer="block03", in_one=None) -> dict:
    """A TokenNormMonitor result for a 4-block backbone: ``layer``'s high-norm tokens have
    ``share`` (``in_one`` of one image's patches), appear at ``onset_block`` and sit
    ``background_share`` on the background; every other layer has none."""
    quiet = dict.fromkeys(("onset_layer", *SIGNATURE_KEYS), None)
    signature = {name: {**quiet, "share": 0.0} for name in ("block00", "block03", "output")}
    signature[layer] = {
        "share": share,
        "image_share_max": share if in_one is None else in_one,
        "onset_layer": f"block{onset_block:02d}",
        "onset_block": onset_block,
        "background_share": background_share,
        "neighbour_cosine_high_norm": 0.9,
        "neighbour_cosine_normal": 0.5,
        "cls_attention_on_high_norm": 0.3,
    }
    return {"signature": signature, "depth": 4, "rule": "relative"}


def test_emergence_needs_patience_artifact_like_checks_in_a_row_both_ways():
    watcher = ArtifactEmergence(level=0.01, patience=3)
    artifacts, none = check(0.02), check(0.0)
    checks = [none, artifacts, artifacts, none, artifacts, artifacts, artifacts]
    checks += [none, artifacts, none, check(0.5), check(0.02, onset_block=0)]
    events = [watcher.update(step * 10, "backbone", c) for step, c in enumerate(checks)]
    events = [e for e in events if e]
    assert [(e["event"], e["step"], e["since_step"], e["layer"]) for e in events] == [
        ("emerged", 60, 40, "block03"),
        ("vanished", 110, 90, "block03"),
    ]
    assert events[0]["onset_layer"] == "block02" and events[0]["background_share"] == 0.9
    assert events[0]["cls_attention_on_high_norm"] == 0.3 and events[0]["rule"] == "relative"


@pytest.mark.parametrize(
    "look_alike",
    [
        check(0.14),  # too many
        check(0.02, onset_block=0),  # from the first block on
        check(0.02, background_share=0.2),  # on the objects
        check(0.02, in_one=0.3),  # one image's whole background
    ],
    ids=["many", "early", "on_objects", "in_one_image"],
)
def test_persistent_look_alikes_make_no_event(look_alike):
    watcher = ArtifactEmergence(level=0.01, patience=2)
    assert not any(watcher.update(step, "backbone", look_alike) for step in range(10))
    assert watcher.update(10, "backbone", check(0.02)) is None
    assert watcher.update(11, "backbone", check(0.02))["event"] == "emerged"


def test_emergence_watches_one_layer_when_told():
    on_output = ArtifactEmergence(layer="output", patience=1)
    assert on_output.update(0, "backbone", check(0.02, layer="block03")) is None
    assert on_output.update(1, "backbone", check(0.02, layer="output"))["layer"] == "output"


def test_probing_leaves_training_flags_and_random_state_untouched():
    model = tiny_backbone()
    model.train()
    model.blocks[0].eval()
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    with probing(model):
        assert not any(m.training for m in model.modules())
        torch.rand(5), random.random(), np.random.rand()
    assert (torch.rand(2).tolist(), random.random(), np.random.rand()) == (
        expected[0].tolist(),
        expected[1],
        expected[2],
    )
    assert model.training and not model.blocks[0].training and model.blocks[1].training


def test_planted_high_norm_tokens_are_read_back_from_the_event_files(tmp_path, demo_shards):
    backbone = planted_backbone()
    callbacks = monitors()
    trainer = fit_demo(tmp_path, demo_shards, backbone, callbacks)
    events = accumulator(trainer.log_dir)
    percent = 100 * len(PLANTED) / 16
    for layer in ("block00", "block01", "output"):
        for rule in ("high_norm_share_absolute", "high_norm_share_relative"):
            values = events.Scalars(f"artifacts/backbone/{rule}/{layer}")
            assert [v.step for v in values] == [0, 2, 4, 6]
            assert all(v.value == pytest.approx(percent) for v in values), (layer, rule)
        assert events.Scalars(f"artifacts/backbone/max_over_median/{layer}")[0].value > 5

    probe = callbacks[0].probe
    assert probe.shape == (8, 3, 32, 32)
    with torch.no_grad():
        prenorm = backbone.eval().forward_features(probe)["x_prenorm"].norm(dim=-1)
    patches = events.Histograms("token_norms/backbone/block01/patches")
    assert [h.step for h in patches] == [0, 2, 4, 6]
    assert patches[0].histogram_value.num == 8 * 16
    assert patches[0].histogram_value.max == pytest.approx(
        prenorm[:, 1 + REGISTERS :].max().item(), rel=1e-5
    )
    registers = events.Histograms("token_norms/backbone/block01/registers")[0].histogram_value
    assert registers.num == 8 * REGISTERS
    assert registers.max == pytest.approx(prenorm[:, 1 : 1 + REGISTERS].max().item(), rel=1e-5)
    assert events.Histograms("token_norms/backbone/output/cls")[0].histogram_value.num == 8

    # High from the first block on and 12.5 % of the patches: a look-alike, not artifacts.
    assert all(s.value == 0 for s in events.Scalars("artifacts/backbone/onset_block/output"))
    assert [s.value for s in events.Scalars("artifacts/backbone/present")] == [0, 0, 0, 0]
    assert not (tmp_path / "run" / "version_0" / "artifact_events.jsonl").exists()

    side = 96 + 2  # 32 px shown at 3x, plus the grid padding
    norm_maps = events.Images("norm_maps/backbone")
    # Titles above the grid of 3 images x (image, block01, output), the colour bar beside it.
    assert norm_maps[0].height > 3 * side + 2 + 4 * FONT_SIZE
    assert norm_maps[0].width > 3 * side + 2 + 2 * BAR


@pytest.mark.parametrize("name", ["artifacts", "look_alikes"])
def test_planted_tokens_switched_on_fire_the_event_only_with_the_artifact_signature(
    switched_on_runs, name
):
    """Tokens planted from block 1 on the background fire the event two checks after they are
    switched on (after step 4); the same tokens from block 0 on the object never do."""
    run = switched_on_runs[name]
    on_background = name == "artifacts"
    events = accumulator(run)
    share = events.Scalars("artifacts/backbone/high_norm_share_relative/output")
    assert [(s.step, s.value) for s in share] == [
        (step, pytest.approx(100 * 3 / GRID**2 if step >= 4 else 0.0)) for step in range(0, 13, 2)
    ]
    onset = events.Scalars("artifacts/backbone/onset_block/output")
    background = events.Scalars("artifacts/backbone/background_share/output")
    assert [s.step for s in onset] == [s.step for s in background] == [4, 6, 8, 10, 12]
    assert {s.value for s in onset} == {1 if on_background else 0}
    assert {s.value for s in background} == {100.0 if on_background else 0.0}
    attention = events.Scalars("artifacts/backbone/cls_attention_on_high_norm/output")
    assert all(0 < s.value < 100 for s in attention)
    present = [s.value for s in events.Scalars("artifacts/backbone/present")]
    path = run / "artifact_events.jsonl"
    if not on_background:
        assert present == [0] * 7 and not path.exists()
        return
    assert present == [0, 0, 0, 1, 1, 1, 1]
    (event,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert (event["event"], event["step"], event["since_step"]) == ("emerged", 6, 4)
    assert (event["layer"], event["onset_layer"]) == ("block01", "block01")
    assert event["share"] == pytest.approx(3 / GRID**2) and event["background_share"] == 1.0
    assert event["neighbour_cosine_high_norm"] > event["neighbour_cosine_normal"]
    (text,) = events.Tensors("artifacts/events/text_summary")
    assert text.step == 6 and "emerged" in text.tensor_proto.string_val[0].decode()


def test_attention_images_have_the_right_size_and_count(tmp_path, demo_shards):
    trainer = fit_demo(tmp_path, demo_shards, tiny_backbone(), monitors(), max_steps=2)
    events = accumulator(trainer.log_dir)
    tags = sorted(t for t in events.Tags()["images"] if t.startswith("attention/"))
    assert tags == [
        "attention/backbone/heads_cls",
        "attention/backbone/heads_reg0",
        "attention/backbone/heads_reg1",
        "attention/backbone/mean",
    ]
    side = 96 + 2
    mean = events.Images("attention/backbone/mean")
    assert [m.step for m in mean] == [0, 2]
    heads = events.Images("attention/backbone/heads_reg1")[0]
    assert mean[0].height == heads.height > 3 * side + 2 + FONT_SIZE  # the titles above
    # Columns: the image, then [CLS] and each register (or each of 2 heads); the colour bar.
    assert mean[0].width > (1 + 1 + REGISTERS) * side + 2 + 2 * BAR
    assert heads.width > (1 + 2) * side + 2 + 2 * BAR


def test_normal_weights_report_no_emergence(tmp_path, demo_shards):
    trainer = fit_demo(tmp_path, demo_shards, tiny_backbone(), monitors())
    events = accumulator(trainer.log_dir)
    assert [s.value for s in events.Scalars("artifacts/backbone/present")] == [0, 0, 0, 0]
    assert all(
        s.value == 0 for s in events.Scalars("artifacts/backbone/high_norm_share_absolute/output")
    )
    assert "artifacts/events/text_summary" not in events.Tags()["tensors"]
    assert not (tmp_path / "run" / "version_0" / "artifact_events.jsonl").exists()


def test_the_same_seed_gives_the_same_losses_with_and_without_monitoring(tmp_path, demo_shards):
    def losses(callbacks, name):
        seen = []
        record = LambdaCallback(on_train_batch_end=lambda *a: seen.append(a[2]["loss"].item()))
        every_step = [TokenNormMonitor(every_n_steps=1), AttentionMapMonitor(every_n_steps=1)]
        backbone = tiny_backbone()
        backbone.blocks[1].drop_path1 = DropPath(0.2)  # random, and only in training mode
        fit_demo(
            tmp_path / name,
            demo_shards,
            backbone,
            [record, *(every_step if callbacks else [])],
            lr=1e-3,
            mixup_alpha=0.8,
        )
        return seen

    assert losses(True, "with") == losses(False, "without")


def test_figures_are_written_as_png_files(tmp_path, demo_shards):
    callbacks = [
        TokenNormMonitor(every_n_steps=2, layers=[-1], save_png=True),
        AttentionMapMonitor(every_n_steps=2, save_png=True),
    ]
    trainer = fit_demo(tmp_path, demo_shards, tiny_backbone(), callbacks, max_steps=2)
    figures = sorted(p.name for p in (tmp_path / "run" / "version_0" / "figures").iterdir())
    assert len(figures) == 2 * (3 + 1 + 1 + REGISTERS)  # checks at steps 0 and 2
    assert "norm_hist_backbone_step0000002.png" in figures
    extra = callbacks[1].save_figures(tmp_path / "paper")
    assert len(extra) == 1 + 1 + REGISTERS
    assert all(Image.open(p).size[0] > 100 for p in extra)
    assert trainer.global_step == 2


def test_bad_monitor_settings_fail_before_training(tmp_path, demo_shards):
    with pytest.raises(ValueError, match="map_layers"):
        fit_demo(tmp_path, demo_shards, tiny_backbone(), [TokenNormMonitor(map_layers=["block07"])])
    with pytest.raises(ValueError, match="needs a TokenNormMonitor"):
        fit_demo(tmp_path, demo_shards, tiny_backbone(), [ArtifactEmergence()])
    with pytest.raises(ValueError, match="layer 'block05'"):
        fit_demo(
            tmp_path,
            demo_shards,
            tiny_backbone(),
            [TokenNormMonitor(), ArtifactEmergence(layer="block05")],
        )
    with pytest.raises(ValueError, match="rule 'absolute' differs"):
        fit_demo(
            tmp_path,
            demo_shards,
            tiny_backbone(),
            [TokenNormMonitor(), ArtifactEmergence(rule="absolute")],
        )
    with pytest.raises(ValueError, match="TokenNormMonitor.rule must be one of"):
        TokenNormMonitor(rule="median")
    with pytest.raises(ValueError, match="ArtifactEmergence needs 0 <= level < max_level"):
        ArtifactEmergence(level=0.2, max_level=0.1)

"""Monitoring callbacks: planted high-norm tokens read back from TensorBoard event files."""

import json
import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import LambdaCallback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.layers import DropPath

from lightning_registers.callbacks import (
    ArtifactEmergence,
    AttentionMapMonitor,
    TokenNormMonitor,
    probing,
)
from lightning_registers.data import ShardDataModule
from lightning_registers.measures import high_norm_stats, token_norms
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import SupervisedModule

PLANTED = [2, 9]  # patch indices (of 16) that get a huge norm in every image
REGISTERS = 2


def tiny_backbone(seed: int = 0) -> RegisterViT:
    torch.manual_seed(seed)
    return RegisterViT(
        "vit_tiny",
        img_size=32,
        patch_size=8,
        num_registers=REGISTERS,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )


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


def accumulator(log_dir) -> EventAccumulator:
    events = EventAccumulator(
        str(log_dir), size_guidance={"histograms": 0, "images": 0, "scalars": 0, "tensors": 0}
    )
    events.Reload()
    return events


def fit(tmp_path, demo_shards, backbone, callbacks, max_steps=6, lr=0.0, **module_args):
    L.seed_everything(0)
    module = SupervisedModule(
        backbone,
        num_classes=10,
        image_size=32,
        lr=lr,
        warmup_epochs=0,
        optimizer="adamw",
        **module_args,
    )
    data = ShardDataModule(
        str(demo_shards / "train" / "*.tar"),
        str(demo_shards / "val" / "*.tar"),
        batch_size=4,
        num_workers=0,
        samples_per_epoch=16,
        image_size=32,
        num_classes=10,
    )
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def monitors(**emergence):
    return [
        TokenNormMonitor(
            every_n_steps=2, probe_size=8, n_images=3, map_layers=["block01", "output"]
        ),
        AttentionMapMonitor(every_n_steps=2, n_images=3),
        ArtifactEmergence(level=0.05, patience=2, **emergence),
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


def test_emergence_needs_patience_checks_in_a_row_both_ways():
    watcher = ArtifactEmergence(level=0.01, patience=3)
    shares = [0.0, 0.02, 0.02, 0.0, 0.02, 0.02, 0.02, 0.0, 0.02, 0.0, 0.0, 0.0]
    events = []
    for step, share in enumerate(shares):
        event = watcher.update(
            step * 10, "backbone", {"stats": {"output": {"high_norm_share_relative": share}}}
        )
        events += [event] if event else []
    assert [(e["event"], e["step"], e["since_step"]) for e in events] == [
        ("emerged", 60, 40),
        ("vanished", 110, 90),
    ]


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
    trainer = fit(tmp_path, demo_shards, backbone, callbacks)
    events = accumulator(trainer.log_dir)
    share = len(PLANTED) / 16
    for layer in ("block00", "block01", "output"):
        for rule in ("high_norm_share_absolute", "high_norm_share_relative"):
            values = events.Scalars(f"artifacts/backbone/{layer}/{rule}")
            assert [v.step for v in values] == [0, 2, 4, 6]
            assert all(v.value == pytest.approx(share) for v in values), (layer, rule)
        assert events.Scalars(f"artifacts/backbone/{layer}/max_over_median")[0].value > 5

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

    assert [s.value for s in events.Scalars("artifacts/backbone/present")] == [0, 1, 1, 1]
    texts = events.Tensors("artifacts/events/text_summary")
    assert len(texts) == 1 and texts[0].step == 2
    assert "emerged" in texts[0].tensor_proto.string_val[0].decode()
    lines = (tmp_path / "run" / "version_0" / "artifact_events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["emerged"]
    assert json.loads(lines[0])["step"] == 2

    side = 96 + 2  # 32 px shown at 3x, plus the grid padding
    norm_maps = events.Images("norm_maps/backbone")
    assert (norm_maps[0].height, norm_maps[0].width) == (3 * side + 2, 3 * side + 2)


def test_attention_images_have_the_right_size_and_count(tmp_path, demo_shards):
    trainer = fit(tmp_path, demo_shards, tiny_backbone(), monitors(), max_steps=2)
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
    assert (mean[0].height, mean[0].width) == (3 * side + 2, (2 + REGISTERS) * side + 2)
    heads = events.Images("attention/backbone/heads_reg1")[0]
    assert (heads.height, heads.width) == (3 * side + 2, 2 * side + 2)


def test_normal_weights_report_no_emergence(tmp_path, demo_shards):
    trainer = fit(tmp_path, demo_shards, tiny_backbone(), monitors())
    events = accumulator(trainer.log_dir)
    assert [s.value for s in events.Scalars("artifacts/backbone/present")] == [0, 0, 0, 0]
    assert all(
        s.value == 0 for s in events.Scalars("artifacts/backbone/output/high_norm_share_absolute")
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
        fit(
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
    trainer = fit(tmp_path, demo_shards, tiny_backbone(), callbacks, max_steps=2)
    figures = sorted(p.name for p in (tmp_path / "run" / "version_0" / "figures").iterdir())
    assert len(figures) == 2 * (3 + 1 + 1 + REGISTERS)  # checks at steps 0 and 2
    assert "norm_hist_backbone_step0000002.png" in figures
    extra = callbacks[1].save_figures(tmp_path / "paper")
    assert len(extra) == 1 + 1 + REGISTERS
    assert all(Image.open(p).size[0] > 100 for p in extra)
    assert trainer.global_step == 2


def test_bad_monitor_settings_fail_before_training(tmp_path, demo_shards):
    with pytest.raises(ValueError, match="map_layers"):
        fit(tmp_path, demo_shards, tiny_backbone(), [TokenNormMonitor(map_layers=["block07"])])
    with pytest.raises(ValueError, match="needs a TokenNormMonitor"):
        fit(tmp_path, demo_shards, tiny_backbone(), [ArtifactEmergence()])
    with pytest.raises(ValueError, match="layer 'block05'"):
        fit(
            tmp_path,
            demo_shards,
            tiny_backbone(),
            [TokenNormMonitor(), ArtifactEmergence(layer="block05")],
        )

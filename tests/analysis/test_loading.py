"""Every checkpoint format loads into a RegisterViT that computes what the source model does."""

import open_clip
import pytest
import timm
import torch
from demo_run import ROOT, demo_data, write_yaml
from open_clip.constants import OPENAI_DATASET_MEAN
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN

from lightning_registers.analysis import load_backbone
from lightning_registers.cli import lightning_main
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import export_backbone, load_objective


def randomize(module: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.ndim == 1 else 0.0))


def patch_tokens(model: RegisterViT, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(x)["x_norm_patchtokens"]


@pytest.mark.parametrize(
    "name, kwargs, registers",
    [
        ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2), 4),
        ("vit_tiny_patch16_224", dict(img_size=32, depth=2), 0),
    ],
)
def test_timm_weights_load_with_their_architecture_read_from_the_shapes(
    tmp_path, name, kwargs, registers
):
    ref = timm.create_model(name, num_classes=0, **kwargs).eval()
    randomize(ref)
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    loaded = load_backbone(tmp_path / "model.safetensors", "timm")
    model = loaded.model
    assert model.num_registers == registers and model.depth == 2
    assert model.num_heads == ref.blocks[0].attn.num_heads
    assert loaded.mean == IMAGENET_DEFAULT_MEAN and loaded.name == "model"
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        expected = ref.forward_features(x)[:, ref.num_prefix_tokens :]
    torch.testing.assert_close(patch_tokens(model, x), expected, atol=1e-5, rtol=1e-5)


def test_dinov2_hub_and_training_checkpoints_load_with_the_hubs_interpolation(tmp_path):
    source = RegisterViT(
        "vit_small",
        img_size=56,
        patch_size=14,
        depth=2,
        num_registers=0,
        layerscale_init=1e-5,
        interpolate_antialias=False,
        interpolate_offset=0.1,
    ).eval()
    randomize(source)
    torch.save(source.state_dict(), tmp_path / "dinov2_vits14.pth")
    chunked = {
        f"backbone.{k.replace('blocks.', 'blocks.0.', 1)}": v
        for k, v in source.state_dict().items()
    }
    torch.save({"teacher": chunked}, tmp_path / "teacher_checkpoint.pth")
    x = torch.randn(2, 3, 70, 84)  # another size: position embeddings are interpolated
    for file in ("dinov2_vits14.pth", "teacher_checkpoint.pth"):
        model = load_backbone(tmp_path / file, "dinov2").model
        assert (model.config.interpolate_antialias, model.config.interpolate_offset) == (False, 0.1)
        assert model.num_heads == 6 and model.config.layerscale_init is not None
        torch.testing.assert_close(patch_tokens(model, x), patch_tokens(source, x))


def test_open_clip_weights_load_with_openai_normalization(tmp_path):
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    visual = clip.visual.eval()
    randomize(visual)
    visual.output_tokens = True
    torch.save(clip.state_dict(), tmp_path / "open_clip_model.bin")
    loaded = load_backbone(tmp_path / "open_clip_model.bin", "open_clip")
    assert loaded.mean == OPENAI_DATASET_MEAN
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        _, tokens = visual(x)
    torch.testing.assert_close(patch_tokens(loaded.model, x), tokens, atol=1e-4, rtol=1e-4)


def test_our_training_checkpoint_and_its_export_load(tmp_path, demo_shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = {
        "model": {"init_args": {"backbone": {"init_args": {
            "arch": "vit_tiny", "embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8}}}},
        "data": demo_data(demo_shards, samples_per_epoch=8),
    }  # fmt: skip
    overrides = write_yaml(tmp_path / "tiny.yaml", tiny)
    lightning_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/demo/clip.yaml"),
            "--config",
            str(overrides),
            "--trainer.max_steps=1",
            "--trainer.callbacks=[]",
            "--experiment=analysis",
        ]
    )
    ckpt = tmp_path / "runs/analysis/version_0/checkpoints/last.ckpt"
    loaded = load_backbone(ckpt)
    assert loaded.name == "analysis/version_0/last"
    assert loaded.mean == OPENAI_DATASET_MEAN  # a CLIP objective normalizes as OpenCLIP
    x = torch.randn(2, 3, 32, 32)
    reference = load_objective(ckpt).backbone
    torch.testing.assert_close(patch_tokens(loaded.model, x), patch_tokens(reference, x))

    exported = export_backbone(ckpt, tmp_path / "backbone.pt")
    again = load_backbone(exported)
    assert again.mean == OPENAI_DATASET_MEAN and again.name == "backbone"
    torch.testing.assert_close(patch_tokens(again.model, x), patch_tokens(reference, x))


def test_unloadable_checkpoints_fail_with_a_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_backbone(tmp_path / "missing.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="--format"):
        load_backbone(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format must be one of"):
        load_backbone(tmp_path / "other.pt", "mae")
    with pytest.raises(ValueError, match="not a timm ViT state dict"):
        load_backbone(tmp_path / "other.pt", "timm")

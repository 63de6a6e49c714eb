"""Parity of RegisterViT with timm's and open_clip's own models through our converters."""

import open_clip
import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from lightning_registers.models import (
    CheckpointMismatchError,
    RegisterViT,
    create_timm_model,
    load_pretrained,
)

torch.manual_seed(0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize(module: torch.nn.Module) -> None:
    """Random weights everywhere (also LayerNorm, LayerScale, tokens) so no key can hide."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if p.ndim == 1 else 0.0))


def timm_tokens(model, x):
    """timm's normalized output split into [CLS], registers, patches."""
    out = model.forward_features(x)
    r = model.num_prefix_tokens
    return out[:, 0], out[:, 1:r], out[:, r:]


def our_tokens(model, x):
    f = model.forward_features(x)
    return f["x_norm_clstoken"], f["x_norm_regtokens"], f["x_norm_patchtokens"]


def assert_same_tokens(ours, theirs, tol=1e-5):
    for name, a, b in zip(("cls", "registers", "patches"), ours, theirs, strict=True):
        assert a.shape == b.shape, name
        if b.numel():
            assert rel_err(a, b) <= tol, f"{name}: relative error {rel_err(a, b):.2e}"


@torch.no_grad()
def test_timm_dinov2_reg4_parity_and_export_roundtrip():
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=112, num_classes=0).eval()
    randomize(ref)
    ours = RegisterViT(
        "vit_small", img_size=112, patch_size=14, num_registers=4, layerscale_init=1e-5
    ).eval()
    load_pretrained(ours, ref.state_dict(), layout="timm")
    x = torch.randn(2, 3, 112, 112)
    assert_same_tokens(our_tokens(ours, x), timm_tokens(ref, x))

    exported = create_timm_model(ours).eval()
    assert_same_tokens(timm_tokens(exported, x), timm_tokens(ref, x))


@pytest.mark.parametrize("reg_tokens", [0, 4])
@torch.no_grad()
def test_timm_vit_base_parity_with_and_without_registers(reg_tokens):
    ref = timm.create_model("vit_base_patch16_224", reg_tokens=reg_tokens, num_classes=10).eval()
    randomize(ref)
    ours = RegisterViT("vit_base", img_size=224, patch_size=16, num_registers=reg_tokens).eval()
    load_pretrained(ours, ref.state_dict(), layout="timm")
    x = torch.randn(2, 3, 224, 224)
    assert_same_tokens(our_tokens(ours, x), timm_tokens(ref, x))

    # Export to the layout of the original model (position embedding on [CLS] and registers).
    exported = create_timm_model(ours, no_embed_class=False).eval()
    assert_same_tokens(timm_tokens(exported, x), timm_tokens(ref, x))


@torch.no_grad()
def test_dinov2_hub_layout_matches_timms_own_dinov2_conversion():
    """Our model's state dict is in DINOv2-hub layout; timm's converter is the reference."""
    src = RegisterViT(
        "vit_small", img_size=56, patch_size=14, num_registers=4, layerscale_init=1e-5, depth=4
    )
    randomize(src)
    dinov2_sd = {k: v.clone() for k, v in src.state_dict().items()}
    # DINOv2 training checkpoints chunk their blocks: blocks.<chunk>.<index>.
    chunked = {k.replace("blocks.", "blocks.0.", 1): v for k, v in dinov2_sd.items()}

    ref = timm.create_model(
        "vit_small_patch14_reg4_dinov2", img_size=56, depth=4, num_classes=0
    ).eval()
    ref.load_state_dict(checkpoint_filter_fn(dict(dinov2_sd), ref), strict=True)
    ours = RegisterViT(
        "vit_small", img_size=56, patch_size=14, num_registers=4, layerscale_init=1e-5, depth=4
    ).eval()
    load_pretrained(ours, chunked, layout="dinov2")
    x = torch.randn(2, 3, 56, 56)
    assert_same_tokens(our_tokens(ours, x), timm_tokens(ref, x))


@torch.no_grad()
def test_dinov2_swiglu_layout_matches_timm_giant_style_model():
    """ViT-g's SwiGLU (w12/w3) converts to a model equal to timm's SwiGLUPacked ViT."""
    src = RegisterViT(
        "vit_giant2",
        img_size=28,
        patch_size=14,
        num_registers=4,
        embed_dim=96,
        depth=2,
        num_heads=4,
        layerscale_init=1e-5,
    )
    randomize(src)
    sd = {
        k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v
        for k, v in src.state_dict().items()
    }
    ours = RegisterViT(
        "vit_giant2",
        img_size=28,
        patch_size=14,
        num_registers=4,
        embed_dim=96,
        depth=2,
        num_heads=4,
        layerscale_init=1e-5,
    ).eval()
    load_pretrained(ours, sd, layout="dinov2")
    ref = create_timm_model(ours).eval()
    ref2 = timm.create_model(
        "vit_giant_patch14_reg4_dinov2",
        img_size=28,
        embed_dim=96,
        depth=2,
        num_heads=4,
        num_classes=0,
    ).eval()
    ref2.load_state_dict(checkpoint_filter_fn(dict(sd), ref2), strict=True)
    x = torch.randn(2, 3, 28, 28)
    assert_same_tokens(our_tokens(ours, x), timm_tokens(ref2, x))
    assert_same_tokens(timm_tokens(ref, x), timm_tokens(ref2, x))


@torch.no_grad()
def test_open_clip_vit_b16_visual_parity():
    clip = open_clip.create_model("ViT-B-16", pretrained=None)
    visual = clip.visual.eval()
    randomize(visual)
    visual.output_tokens = True
    ours = RegisterViT(
        "vit_base", img_size=224, patch_size=16, num_registers=0, pre_norm=True, norm_eps=1e-5
    ).eval()
    load_pretrained(ours, clip.state_dict(), layout="open_clip")
    x = torch.randn(2, 3, 224, 224)
    pooled, tokens = visual(x)
    f = ours.forward_features(x)
    assert rel_err(f["x_norm_patchtokens"], tokens) <= 1e-5
    assert rel_err(f["x_norm_clstoken"] @ visual.proj, pooled) <= 1e-5


@torch.no_grad()
def test_position_embedding_interpolates_like_timm_to_non_square_size():
    ref = timm.create_model(
        "vit_small_patch14_reg4_dinov2", img_size=56, depth=2, num_classes=0, dynamic_img_size=True
    ).eval()
    randomize(ref)
    ours = RegisterViT(
        "vit_small", img_size=56, patch_size=14, num_registers=4, layerscale_init=1e-5, depth=2
    ).eval()
    load_pretrained(ours, ref.state_dict(), layout="timm")
    x = torch.randn(2, 3, 70, 112)
    ours_out = our_tokens(ours, x)
    assert ours_out[2].shape == (2, 5 * 8, 384)
    assert_same_tokens(ours_out, timm_tokens(ref, x))


def test_pretrained_position_embedding_is_resampled_to_the_model_grid():
    src = RegisterViT("vit_tiny", img_size=64, patch_size=16, num_registers=0, depth=1)
    dst = RegisterViT("vit_tiny", img_size=32, patch_size=16, num_registers=0, depth=1)
    load_pretrained(dst, src.state_dict())
    assert dst.pos_embed.shape == (1, 1 + 4, 192)
    torch.testing.assert_close(dst.pos_embed[:, 0], src.pos_embed[:, 0])


def test_mismatched_state_dict_names_missing_and_unexpected_keys():
    model = RegisterViT("vit_tiny", img_size=32, patch_size=16, num_registers=4, depth=2)
    sd = model.state_dict()
    sd.pop("blocks.1.attn.qkv.weight")
    sd.pop("register_tokens")
    sd["blocks.7.norm1.weight"] = torch.ones(192)
    with pytest.raises(CheckpointMismatchError) as err:
        load_pretrained(model, sd)
    message = str(err.value)
    assert "blocks.1.attn.qkv.weight" in message and "register_tokens" in message
    assert "blocks.7.norm1.weight" in message
    missing, unexpected = load_pretrained(model, sd, strict=False)
    assert missing == ["blocks.1.attn.qkv.weight", "register_tokens"]
    assert unexpected == ["blocks.7.norm1.weight"]


def test_unknown_layout_is_refused():
    model = RegisterViT("vit_tiny", img_size=32, patch_size=16, depth=1)
    with pytest.raises(ValueError, match="layout"):
        load_pretrained(model, model.state_dict(), layout="mae")


@pytest.mark.parametrize("reg_tokens", [0, 4])
@torch.no_grad()
def test_openclip_style_backbone_matches_timms_clip_vit_both_ways(reg_tokens):
    """ln_pre, LayerNorm eps 1e-5 and no patch bias: timm's own CLIP ViT-B/16 (two blocks) loads
    into ours, and create_timm_model hands ours back to timm."""
    ref = timm.create_model(
        "vit_base_patch16_clip_224",
        depth=2,
        reg_tokens=reg_tokens,
        no_embed_class=reg_tokens > 0,
        num_classes=0,
    ).eval()
    randomize(ref)
    ours = RegisterViT(
        "vit_base",
        depth=2,
        num_registers=reg_tokens,
        pre_norm=True,
        norm_eps=1e-5,
        patch_bias=False,
    ).eval()
    assert ours.patch_embed.proj.bias is None
    load_pretrained(ours, ref.state_dict(), layout="timm")
    x = torch.randn(2, 3, 224, 224)
    assert_same_tokens(our_tokens(ours, x), timm_tokens(ref, x))
    exported = create_timm_model(ours).eval()
    assert_same_tokens(timm_tokens(exported, x), timm_tokens(ref, x))


@torch.no_grad()
def test_pre_norm_backbone_with_patch_bias_folds_it_into_timms_position_embedding():
    """timm has no patch bias with pre_norm: the constant bias moves into the patch positions."""
    ours = RegisterViT(
        "vit_tiny", img_size=32, patch_size=8, depth=2, num_registers=4, pre_norm=True
    ).eval()
    randomize(ours)
    x = torch.randn(2, 3, 32, 48)
    for no_embed_class in (True, False):
        exported = create_timm_model(ours, no_embed_class=no_embed_class).eval()
        assert exported.patch_embed.proj.bias is None
        assert_same_tokens(timm_tokens(exported, x), our_tokens(ours, x))


def test_patch_bias_loads_across_models_with_and_without_one():
    with_bias = RegisterViT("vit_tiny", img_size=32, patch_size=16, depth=1)
    without = RegisterViT("vit_tiny", img_size=32, patch_size=16, depth=1, patch_bias=False)
    load_pretrained(with_bias, without.state_dict())
    assert not with_bias.patch_embed.proj.bias.any()
    load_pretrained(without, with_bias.state_dict())  # a zero bias: nothing is lost
    with torch.no_grad():
        with_bias.patch_embed.proj.bias.fill_(0.5)
    with pytest.raises(CheckpointMismatchError, match="patch_embed.proj.bias"):
        load_pretrained(without, with_bias.state_dict())

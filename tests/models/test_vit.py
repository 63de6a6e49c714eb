"""RegisterViT's token layout, attention paths, masking and errors."""

import pytest
import torch

from lightning_registers.models import ARCHS, RegisterViT


def tiny(**kwargs) -> RegisterViT:
    args = dict(arch="vit_tiny", img_size=32, patch_size=8, depth=2, num_registers=4)
    args.update(kwargs)
    return RegisterViT(**args)


@pytest.mark.parametrize("num_registers", [0, 1, 4, 16])
def test_token_order_and_shapes(num_registers):
    model = tiny(num_registers=num_registers).eval()
    x = torch.randn(3, 3, 32, 32)
    f = model.forward_features(x)
    assert f["x_prenorm"].shape == (3, 1 + num_registers + 16, 192)
    assert f["x_norm_clstoken"].shape == (3, 192)
    assert f["x_norm_regtokens"].shape == (3, num_registers, 192)
    assert f["x_norm_patchtokens"].shape == (3, 16, 192)
    normed = model.norm(f["x_prenorm"])
    torch.testing.assert_close(normed[:, 0], f["x_norm_clstoken"])
    torch.testing.assert_close(normed[:, 1 : 1 + num_registers], f["x_norm_regtokens"])
    torch.testing.assert_close(normed[:, 1 + num_registers :], f["x_norm_patchtokens"])
    torch.testing.assert_close(model(x), f["x_norm_clstoken"])


def test_registers_carry_no_position_embedding_and_sit_after_cls():
    model = tiny(num_registers=2).eval()
    tokens = model.prepare_tokens(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(tokens[0, 1:3], model.register_tokens[0])
    torch.testing.assert_close(tokens[0, 0], model.cls_token[0, 0] + model.pos_embed[0, 0])


def test_named_sizes_and_any_patch_size():
    for arch, spec in ARCHS.items():
        model = RegisterViT(arch, img_size=28, patch_size=14, depth=1)
        assert model.embed_dim == spec["embed_dim"] and model.num_heads == spec["num_heads"]
    assert RegisterViT("vit_small", img_size=30, patch_size=10, depth=1).grid_size == (3, 3)
    assert tiny().depth == 2


def test_non_square_input_interpolates_position_embedding():
    model = tiny().eval()
    f = model.forward_features(torch.randn(2, 3, 16, 40))
    assert f["x_norm_patchtokens"].shape == (2, 2 * 5, 192)
    pos = model.interpolate_pos_encoding((2, 5))
    assert pos.shape == (1, 1 + 10, 192)
    torch.testing.assert_close(pos[:, 0], model.pos_embed[:, 0])


def test_captured_attention_is_a_softmax_and_the_output_matches_sdpa():
    model = tiny(layerscale_init=0.1).eval()
    images = torch.randn(2, 3, 32, 32)
    plain = model(images)
    with model.capture_attention([0, -1]) as attention:
        explicit = model(images)
    assert sorted(attention) == [0, model.depth - 1]
    for attn in attention.values():
        assert attn.shape == (2, 3, 21, 21)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 21))
        assert (attn >= 0).all()
    torch.testing.assert_close(explicit, plain, atol=1e-5, rtol=1e-5)
    last = model.get_last_self_attention(images)
    torch.testing.assert_close(last, attention[model.depth - 1])


def test_training_pays_nothing_for_attention_weights():
    model = tiny()
    with model.capture_attention():
        pass
    assert not any(block.attn.keep_attention for block in model.blocks)
    model(torch.randn(1, 3, 32, 32))
    assert all(block.attn.attention is None for block in model.blocks)


def test_masks_replace_exactly_the_masked_patch_embeddings():
    model = tiny().eval()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 7]] = True
    masks[1, 15] = True
    plain = model.prepare_tokens(x)
    masked = model.prepare_tokens(x, masks)
    patches_plain, patches_masked = plain[:, 5:], masked[:, 5:]
    pos = model.pos_embed[0, 1:]
    expected = (model.mask_token + pos)[masks.nonzero()[:, 1]]
    torch.testing.assert_close(patches_masked[masks], expected)
    torch.testing.assert_close(patches_masked[~masks], patches_plain[~masks])
    torch.testing.assert_close(masked[:, :5], plain[:, :5])
    assert model.forward_features(x, masks)["masks"] is masks


def test_registers_receive_gradients():
    model = tiny()
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert model.register_tokens.grad is not None
    assert model.register_tokens.grad.abs().sum() > 0


def test_intermediate_layers_follow_dinov2_conventions():
    model = tiny(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    outs = model.get_intermediate_layers(x, n=2)
    assert len(outs) == 2 and outs[0].shape == (2, 16, 192)
    torch.testing.assert_close(outs[-1], model.forward_features(x)["x_norm_patchtokens"])
    reshaped = model.get_intermediate_layers(x, n=[0], reshape=True, return_class_token=True)
    patches, cls = reshaped[0]
    assert patches.shape == (2, 192, 4, 4) and cls.shape == (2, 192)
    raw = model.get_block_outputs(x, [1])[0]
    assert raw.shape == (2, 21, 192)
    with pytest.raises(ValueError, match="out of range"):
        model.get_block_outputs(x, [3])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.0)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for g, p in zip(grads, model.parameters(), strict=True):
        assert (g is None) == (p.grad is None)
        if g is not None:
            torch.testing.assert_close(p.grad, g)


def test_image_size_not_divisible_by_patch_size_names_both():
    with pytest.raises(ValueError, match=r"30x32 is not divisible by patch size 8"):
        tiny().forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"image size 30x30 .* patch size 16"):
        RegisterViT("vit_tiny", img_size=30, patch_size=16)


def test_unknown_arch_and_ffn_are_refused():
    with pytest.raises(ValueError, match="arch"):
        RegisterViT("vit_huge_typo")
    with pytest.raises(ValueError, match="ffn"):
        tiny(ffn="geglu")


def test_stochastic_depth_is_linear_over_depth_or_uniform():
    linear = tiny(depth=3, drop_path_rate=0.2)
    uniform = tiny(depth=3, drop_path_rate=0.2, drop_path_uniform=True)
    assert isinstance(linear.blocks[0].drop_path1, torch.nn.Identity)
    assert [b.drop_path1.drop_prob for b in linear.blocks[1:]] == pytest.approx([0.1, 0.2])
    assert [b.drop_path2.drop_prob for b in uniform.blocks] == pytest.approx([0.2] * 3)


def test_forward_returns_the_features_dict_on_request():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, 3] = True
    with torch.no_grad():
        features = model(x, masks, return_features=True)
        expected = model.forward_features(x, masks)
        cls = model(x)
    torch.testing.assert_close(features["x_norm_patchtokens"], expected["x_norm_patchtokens"])
    torch.testing.assert_close(cls, model.forward_features(x)["x_norm_clstoken"])

"""Each measurement on a backbone with high-norm tokens planted at known places, and on small
cases computed by hand."""

import pytest
import torch
import torch.nn.functional as F
from planted import (
    GRID,
    PATCH,
    PLANTED,
    PLANTED_BLOCK,
    PLANTED_NEURON,
    planted_backbone,
    redundant_images,
)

from lightning_registers.analysis import (
    OutlierRule,
    add_test_time_register,
    attention_maps,
    attention_on_high_norm,
    box_iou,
    centred_boxes,
    corloc,
    find_register_neurons,
    first_high_norm_layer,
    layer_statistics,
    load_images,
    lost,
    lost_box,
    neighbour_cosine,
    neighbour_similarity,
    output_tokens,
    patch_norms_by_layer,
    pixel_probe,
    position_probe,
    token_classification,
)
from lightning_registers.analysis.probes import fit_ridge
from lightning_registers.data import write_demo_shards
from lightning_registers.models import RegisterViT

PLANTED_MASK = torch.zeros(GRID * GRID, dtype=torch.bool)
PLANTED_MASK[list(PLANTED)] = True


@pytest.fixture(scope="module")
def planted():
    return planted_backbone()


@pytest.fixture(scope="module")
def images():
    return redundant_images(64)


@pytest.fixture(scope="module")
def norms(planted, images):
    return patch_norms_by_layer(planted, images)


def test_norm_measures_find_the_planted_tokens_and_their_layer(planted, images, norms):
    stats = layer_statistics(norms)
    share = len(PLANTED) / GRID**2
    for rule in ("absolute", "relative"):
        flags = OutlierRule(rule).mask(norms["output"])
        assert torch.equal(flags, PLANTED_MASK.expand_as(flags)), rule
        assert stats["output"][f"high_norm_share_{rule}"] == pytest.approx(share)
        assert stats["block00"][f"high_norm_share_{rule}"] == 0
        assert (
            first_high_norm_layer(stats, f"high_norm_share_{rule}") == f"block{PLANTED_BLOCK:02d}"
        )
    assert stats["output"]["p50"] < 20 < 150 < stats["output"]["max"]

    clean = layer_statistics(patch_norms_by_layer(planted_backbone(plant=False), images))
    assert all(
        s["high_norm_share_relative"] == 0 and s["high_norm_share_absolute"] == 0
        for s in clean.values()
    )
    assert first_high_norm_layer(clean, "high_norm_share_relative") is None


def test_neighbour_cosine_matches_a_hand_computed_grid():
    x = torch.randn(2, 3, 4, 5)
    expected = torch.zeros(2, 3, 4)
    for r in range(3):
        for c in range(4):
            near = [(r + dr, c + dc) for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))]
            near = [(a, b) for a, b in near if 0 <= a < 3 and 0 <= b < 4]
            sims = [F.cosine_similarity(x[:, r, c], x[:, a, b], dim=-1) for a, b in near]
            expected[:, r, c] = torch.stack(sims).mean(0)
    torch.testing.assert_close(neighbour_cosine(x), expected)


@pytest.mark.parametrize("uniform_at_planted", [True, False])
def test_neighbour_similarity_splits_by_norm(planted, uniform_at_planted):
    images = redundant_images(32, uniform_at_planted=uniform_at_planted)
    flags = PLANTED_MASK.expand(32, -1)
    result = neighbour_similarity(planted, images, flags)
    if uniform_at_planted:  # the paper's case: artifacts on redundant patches
        assert result["mean_high_norm"] > 0.99 and result["mean_normal"] < 0.6
    else:
        assert result["mean_high_norm"] < 0.5 < result["mean_normal"]
    assert len(result["high_norm"]) == 32 * len(PLANTED)


def test_position_and_pixel_probes_are_poorer_on_high_norm_tokens(planted, images, norms):
    flags = OutlierRule().mask(norms["output"])
    _, patches = output_tokens(planted, images)
    position = position_probe(patches, (GRID, GRID), flags)
    assert position["top1"]["normal"] > 0.95
    assert position["top1"]["high_norm"] < position["top1"]["normal"] - 0.2
    assert position["distance"]["high_norm"] > position["distance"]["normal"] + 0.5
    assert position["test_tokens"] == {"normal": 32 * (GRID**2 - 3), "high_norm": 32 * 3}
    pixels = pixel_probe(patches, images, PATCH, flags)
    assert pixels["l2"]["high_norm"] > 1.2 * pixels["l2"]["normal"]


def test_ridge_recovers_a_linear_map_exactly():
    x = torch.randn(500, 6)
    weight, bias = torch.randn(6, 3), torch.randn(3)
    fitted_weight, fitted_bias = fit_ridge(x, x @ weight + bias, alpha=0.0)
    torch.testing.assert_close(fitted_weight, weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fitted_bias, bias, atol=1e-4, rtol=1e-4)


def test_one_token_classification_reads_the_class_where_a_token_holds_it():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 4
    cls = F.one_hot(labels, 4).float() * 3 + 0.1 * torch.randn(200, 4, generator=gen)
    patches = torch.randn(200, 9, 4, generator=gen)  # no class information
    high = torch.zeros(200, 9, dtype=torch.bool)
    high[:, 0] = True
    patches[:, 0] = cls  # the high-norm token carries the class, as the paper finds
    result = token_classification(cls, patches, high, labels)
    assert result["cls"]["accuracy"] == 1.0 and result["high_norm"]["accuracy"] == 1.0
    assert result["normal"]["accuracy"] < 0.5
    assert result["cls"]["test_images"] == 100
    assert token_classification(cls, patches, high, torch.full((200,), -1)) is None


def test_attention_share_on_high_norm_patches_by_hand():
    attention = torch.zeros(1, 2, 1, 2, 2)  # one image, 2 heads, [CLS] only, 2x2 patches
    attention[0, 0, 0] = torch.tensor([[0.5, 0.5], [0.0, 0.0]])
    attention[0, 1, 0] = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    high = torch.tensor([[False, True, False, False]])
    result = attention_on_high_norm(attention, high)
    assert result["cls"] == pytest.approx(0.75) and result["share_of_patches"] == 0.25


def test_attention_maps_cover_cls_and_every_register():
    model = RegisterViT("vit_tiny", img_size=32, patch_size=8, depth=2, num_registers=3).eval()
    x = torch.randn(5, 3, 32, 32)
    maps = attention_maps(model, x, batch_size=2)
    assert maps["queries"] == ["cls", "reg0", "reg1", "reg2"]
    with torch.no_grad():
        full = model.get_last_self_attention(x)  # (5, heads, 4 + 16, 4 + 16)
    torch.testing.assert_close(maps["attention"], full[:, :, :4, 4:].reshape(5, 3, 4, 4, 4))


def test_lost_box_on_a_hand_made_feature_grid():
    grid = (4, 5)
    features = torch.tensor([1.0, 0.0]).repeat(20, 1)  # background
    obj = [6, 7, 11, 12]  # rows 1-2, columns 1-2
    features[obj] = torch.tensor([-1.0, 1.0])
    features[19] = torch.tensor([-1.0, 1.0])  # a lone patch of the same kind, not connected
    box, seed = lost_box(features, grid, patch_size=8, k=5)
    assert seed in obj
    assert box.tolist() == [8.0, 8.0, 24.0, 24.0]


def test_box_iou_corloc_and_centred_boxes_by_hand():
    truth = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 40.0]])
    iou = box_iou(torch.tensor([5.0, 0.0, 15.0, 10.0]), truth)
    torch.testing.assert_close(iou, torch.tensor([50 / 150, 0.0], dtype=torch.float64))
    predicted = torch.tensor([[0.0, 0.0, 9.0, 10.0], [0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 1.0, 1.0]])
    assert corloc(predicted, [truth, truth, torch.zeros(0, 4)]) == 0.5
    centred = centred_boxes([truth, torch.tensor([[0.0, 0.0, 30.0, 30.0]])], [(64, 64)] * 2)
    # Largest boxes are 10x20 and 30x30: the mean size 20x25, centred at 32.
    torch.testing.assert_close(centred[0], torch.tensor([22.0, 19.5, 42.0, 44.5]))
    # In images of other sizes the box keeps the mean shares of width and height.
    wide = centred_boxes([truth, torch.zeros(0, 4)], [(40, 20), (100, 50)])
    torch.testing.assert_close(wide, torch.tensor([[5.0, 10.0, 15.0, 30.0], [12.5, 25, 37.5, 75]]))


def test_lost_on_demo_scenes_beats_the_centred_box(tmp_path):
    write_demo_shards(tmp_path, train=0, val=200, size=64, seed=0, maxcount=100, progress=False)
    torch.manual_seed(0)
    model = RegisterViT("vit_tiny", img_size=64, patch_size=8, depth=4, num_registers=0).eval()
    data = load_images(tmp_path / "val" / "*.tar", 64, (0.5,) * 3, (0.25,) * 3, limit=200)
    result = lost(model, data.images, data.boxes)
    assert result["evaluated"] == 200
    assert result["corloc"] > result["corloc_centred"] + 0.05
    assert result["boxes"].shape == (200, 4)
    assert ((result["boxes"] >= 0) & (result["boxes"] <= 64)).all()


def test_test_time_register_removes_the_planted_artifacts(planted, images, norms):
    neurons = find_register_neurons(planted, images, top_k=3)
    assert (neurons[0].block, neurons[0].neuron) == (PLANTED_BLOCK, PLANTED_NEURON)
    assert neurons[0].score > 10 * neurons[1].score
    fixed = add_test_time_register(planted, neurons)
    assert fixed.num_registers == planted.num_registers + 1 == 1
    after = patch_norms_by_layer(fixed, images)
    flags = OutlierRule().mask(norms["output"])
    assert OutlierRule("relative").mask(after["output"]).float().mean() < 0.005
    assert after["output"].max() < 150
    _, before_tokens = output_tokens(planted, images)
    _, after_tokens = output_tokens(fixed, images)
    cosine = F.cosine_similarity(before_tokens, after_tokens, dim=-1)
    assert cosine[~flags].mean() > 0.999 and cosine[~flags].min() > 0.99
    # The untouched original still has its artifacts; any batch size gives the same tokens.
    assert torch.equal(patch_norms_by_layer(planted, images)["output"], norms["output"])
    _, one_by_one = output_tokens(fixed, images[:5], batch_size=1)
    torch.testing.assert_close(one_by_one, after_tokens[:5], atol=1e-5, rtol=1e-5)


def test_no_register_neurons_without_high_norm_tokens(images):
    assert find_register_neurons(planted_backbone(plant=False), images) == []

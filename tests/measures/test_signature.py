"""The signature of high-norm tokens (where they sit, when they appear, the [CLS] attention on
them) and the rule that tells artifacts from look-alikes: hand-computed cases, the model's own
attention, and backbones with tokens planted on redundant or on busy patches."""

import pytest
import torch
from analysis.planted import GRID, PATCH, PLANTED, planted_backbone, redundant_images

from lightning_registers.measures import OutlierRule, token_norms
from lightning_registers.measures.placement import UNKNOWN, neighbour_cosine, object_share
from lightning_registers.measures.signature import (
    ArtifactSignature,
    high_norm_signature,
    onset,
    probe_forward,
)
from lightning_registers.models import RegisterViT


def test_object_share_by_hand():
    objects = torch.zeros(2, 8, 8)
    objects[0, 0:4, 0:2] = 1  # half of patch (0, 0)
    objects[0, 4:8, 4:8] = 1  # all of patch (1, 1)
    objects[1] = UNKNOWN
    share = object_share(objects, 4)
    assert share[0].tolist() == [0.5, 0.0, 0.0, 1.0]
    assert share[1].isnan().all()


def test_onset_walks_back_while_most_of_the_tokens_stay_high():
    flags = {
        "block00": [0, 0, 1, 0],
        "block01": [1, 1, 0, 0],
        "block02": [1, 1, 1, 0],
        "output": [1, 1, 1, 0],
    }
    masks = {layer: torch.tensor([f], dtype=torch.bool) for layer, f in flags.items()}
    # At block01 two of the output's three tokens are high (>= half), at block00 only one.
    assert onset(masks, "output") == "block01"
    assert onset(masks, "block00") == "block00"
    masks["block02"][:] = False
    assert onset(masks, "block02") is None
    assert onset(masks, "output") == "output"


def test_signature_by_hand():
    flat = torch.ones(2, 4)
    peaked = torch.tensor([[1.0, 1.0, 1.0, 10.0], [1.0, 1.0, 1.0, 1.0]])
    norms = {"block00": flat, "block01": peaked, "output": peaked}
    redundancy = torch.tensor([[0.1, 0.2, 0.3, 0.9], [0.5, 0.5, 0.5, 0.5]])
    attention = torch.zeros(2, 2, 1, 2, 2)  # 2 images, 2 heads, [CLS], 2x2 patches
    attention[0, 0, 0] = torch.tensor([[0.25, 0.25], [0.0, 0.5]])
    attention[0, 1, 0] = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    attention[1, :, 0] = 0.25
    objects = torch.tensor([[1.0, 1.0, 0.6, 0.2], [float("nan")] * 4])
    signature = high_norm_signature(norms, 2, OutlierRule(), redundancy, attention, objects)
    assert signature["block00"] == {
        "share": 0.0,
        "image_share_max": 0.0,
        "onset_layer": None,
        "onset_block": None,
        "neighbour_cosine_high_norm": None,
        "neighbour_cosine_normal": pytest.approx(3.5 / 8),
        "cls_attention_on_high_norm": None,
        "background_share": None,
    }
    assert signature["output"] == {
        "share": 1 / 8,
        "image_share_max": 1 / 4,
        "onset_layer": "block01",
        "onset_block": 1,
        "neighbour_cosine_high_norm": pytest.approx(0.9),
        "neighbour_cosine_normal": pytest.approx((0.6 + 2.0) / 7),
        # image 0: head mean 0.75 on the token; image 1: no high-norm token.
        "cls_attention_on_high_norm": pytest.approx(0.375),
        "background_share": 1.0,  # 0.2 of the patch on an object: background
    }
    objects[0, 3] = 0.5
    on_object = high_norm_signature(norms, 2, OutlierRule(), redundancy, attention, objects)
    assert on_object["output"]["background_share"] == 0.0
    assert (
        high_norm_signature(norms, 2, OutlierRule(), redundancy, attention)["output"][
            "background_share"
        ]
        is None
    )


def stats(**changes):
    base = {
        "share": 0.03,
        "image_share_max": 0.06,
        "onset_block": 5,
        "background_share": 0.9,
        "neighbour_cosine_high_norm": 0.9,
        "neighbour_cosine_normal": 0.5,
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "failed"),
    [
        ({}, []),
        ({"share": 0.01}, ["few"]),  # at the level is not above it
        ({"share": 0.10}, []),  # at the maximum is still few
        ({"share": 0.14}, ["few"]),
        ({"image_share_max": 0.5}, ["few"]),  # one image's background, not a few in each
        ({"onset_block": 2}, ["late"]),  # block 2 of 12 lies in the first quarter
        ({"onset_block": 3}, []),
        ({"onset_block": None, "share": 0.0}, ["few", "late"]),
        ({"background_share": 0.4}, ["background"]),
        # Without boxes the neighbour similarity decides.
        ({"background_share": None}, []),
        ({"background_share": None, "neighbour_cosine_high_norm": 0.5}, ["redundant"]),
        ({"onset_block": 0, "background_share": 0.0, "share": 0.14}, ["few", "late", "background"]),
    ],
)
def test_artifact_signature_names_each_failed_condition(changes, failed):
    assert ArtifactSignature().failures(stats(**changes), depth=12) == failed


def test_artifact_signature_settings():
    assert ArtifactSignature(min_onset=0).failures(stats(onset_block=0), 12) == []
    assert ArtifactSignature(min_background=0.95).failures(stats(), 12) == ["background"]
    gap = ArtifactSignature(min_redundancy_gap=0.5)
    assert gap.failures(stats(background_share=None), 12) == ["redundant"]
    with pytest.raises(ValueError, match="min_share < max_share"):
        ArtifactSignature(min_share=0.2, max_share=0.1)


def test_probe_forward_measures_in_one_forward_what_the_model_computes():
    model = RegisterViT("vit_tiny", img_size=32, patch_size=8, depth=3, num_registers=2).eval()
    images = torch.randn(3, 3, 32, 40)
    with torch.no_grad():
        probed = probe_forward(model, images, [0, 2])
        norms = token_norms(model, images, [0, 2])
        attention = model.get_last_self_attention(images)[:, :, :3, 3:]
        embedded = model.patch_embed(images).reshape(3, 4, 5, -1)
    assert list(probed["norms"]) == ["block00", "block02", "output"]
    for layer, kinds in norms.items():
        for kind, values in kinds.items():
            torch.testing.assert_close(probed["norms"][layer][kind], values)
    torch.testing.assert_close(probed["attention"], attention.reshape(3, 3, 3, 4, 5))
    torch.testing.assert_close(probed["redundancy"], neighbour_cosine(embedded).flatten(1))


def planted_signature(backbone, images, objects=None) -> dict:
    with torch.no_grad():
        probed = probe_forward(backbone, images, range(backbone.depth))
    patches = {layer: kinds["patches"] for layer, kinds in probed["norms"].items()}
    return high_norm_signature(
        patches, backbone.depth, OutlierRule(), probed["redundancy"], probed["attention"], objects
    )


def test_planted_artifacts_have_the_signature_and_planted_look_alikes_do_not():
    rule = ArtifactSignature()
    artifacts = planted_signature(planted_backbone(), redundant_images(16))
    for layer in ("block01", "block03", "output"):
        assert artifacts[layer]["share"] == pytest.approx(len(PLANTED) / GRID**2)
        assert artifacts[layer]["onset_layer"] == "block01"
        assert rule.failures(artifacts[layer], 4) == [], layer
    assert artifacts["block00"]["share"] == 0

    # The same tokens from block 0 on, on patches unlike their neighbours.
    early = planted_backbone(block_index=0)
    busy = redundant_images(16, uniform_at_planted=False)
    look_alikes = planted_signature(early, busy)
    assert look_alikes["output"]["onset_layer"] == "block00"
    assert rule.failures(look_alikes["output"], 4) == ["late", "redundant"]

    # Where boxes are known they decide: here every planted patch lies on an object.
    objects = torch.zeros(16, GRID * PATCH, GRID * PATCH)
    for p in PLANTED:
        r, c = divmod(p, GRID)
        objects[:, r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = 1
    boxed = planted_signature(planted_backbone(), redundant_images(16), object_share(objects, 8))
    assert boxed["output"]["background_share"] == 0.0
    assert rule.failures(boxed["output"], 4) == ["background"]

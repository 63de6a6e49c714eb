"""The reference protocol: LOST and test-time registers as the authors' code computes them
(valeoai/LOST; nickjiang2378/test-time-registers). Each rule on a small case computed by hand,
and on random features and models against the reference rules restated here on their own
(numpy, one image at a time, hooks where the reference hooks), apart from our implementation."""

import copy
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from planted import PLANTED, planted_backbone, redundant_images
from torch import nn

from lightning_registers.analysis import (
    AnalysisSettings,
    OutlierRule,
    add_test_time_register,
    box_iou,
    corloc,
    find_register_neurons,
    load_images,
    lost,
    lost_box,
    output_tokens,
    pad_to_patches,
    patch_norms_by_layer,
    register_neuron_search,
    run_lost,
    sign_max,
)
from lightning_registers.measures.norms import token_norms
from lightning_registers.models import RegisterViT, ViTConfig

# ---------------------------------------------------------------------------------------------
# The reference rules, restated.


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean grid (0: background), breadth first."""
    labels = np.zeros(mask.shape, dtype=int)
    count = 0
    for start in zip(*np.nonzero(mask), strict=True):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                inside = 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1]
                if inside and mask[rr, cc] and not labels[rr, cc]:
                    labels[rr, cc] = count
                    queue.append((rr, cc))
    return labels


def reference_lost_box(features, grid, patch, k, size, stable=False):
    """object_discovery.lost / patch_scoring / detect_box. The order of patches is the
    reference's own call (torch.argsort of the negated degree, descending), or a stable
    order by degree."""
    gram = features @ features.T
    scored = gram.clone()
    scored.fill_diagonal_(0)
    scored[scored < 0] = 0
    cent = -torch.sum(scored > 0, dim=1).type(torch.float32)
    if stable:
        order = np.argsort(-cent.numpy(), kind="stable")
    else:
        order = torch.argsort(cent, descending=True).numpy()
    a = gram.numpy()
    seed = order[0]
    potentials = order[:k]
    similars = potentials[a[seed, potentials] > 0.0]
    labels = label_components(a[similars].sum(axis=0).reshape(grid) > 0.0)
    component = labels[np.unravel_index(seed, grid)]
    ys, xs = np.nonzero(labels == component)
    box = [xs.min() * patch, ys.min() * patch, (xs.max() + 1) * patch, (ys.max() + 1) * patch]
    box[2], box[3] = min(box[2], size[1]), min(box[3], size[0])
    return box, int(seed)


def capture(model):
    """Hooks keeping each block's output and MLP activation (``mlp.act``, where the reference
    hooks) of a one-image forward."""
    outputs, acts = {}, {}
    handles = []
    for j, block in enumerate(model.blocks):
        handles.append(
            block.register_forward_hook(lambda m, i, o, j=j: outputs.__setitem__(j, o[0].numpy()))
        )
        handles.append(
            block.mlp.act.register_forward_hook(
                lambda m, i, o, j=j: acts.__setitem__(j, o[0].numpy())
            )
        )
    return outputs, acts, handles


def reference_register_neurons(model, images, threshold, layer, top_layer, top_k):
    """shared/algorithms.find_register_neurons (sparsity filter on, as the notebook runs it),
    then utils.filter_layers and the first top_k, one image at a time."""
    outputs, acts, handles = capture(model)
    per_image = []
    with torch.no_grad():
        for image in images:
            model(image[None])
            norms = np.linalg.norm(outputs[layer % model.depth], axis=1)
            where = np.nonzero(norms > threshold)[0]
            if len(where) == 0:
                continue
            scores = []
            for j in range(model.depth):
                act = acts[j]
                sparse = (act < 0.5).sum(axis=0) >= 0.5 * act.shape[0]
                scores.append(np.abs(act[where]).mean(axis=0) * sparse)
            per_image.append(scores)
    for handle in handles:
        handle.remove()
    mean = np.mean(per_image, axis=0)  # (blocks, neurons)
    width = mean.shape[1]
    ranked = [(i // width, i % width, mean.flat[i]) for i in np.argsort(-mean, axis=None)]
    return [r for r in ranked if r[0] <= top_layer][:top_k]


def reference_test_time_register(model, neurons, image, values="sign_max"):
    """hook_fn.activate_on_registers (one register, normal_values="zero") on a copy with one
    more, zero, register token, for one image: the output features and each block's value
    written into the register."""
    ref = copy.deepcopy(model)
    slot = ref.num_prefix_tokens
    zero = torch.zeros(1, 1, ref.embed_dim)
    old = ref.register_tokens
    ref.register_tokens = nn.Parameter(zero if old is None else torch.cat([old.data, zero], 1))
    ref.config = ref.config.replace(num_registers=ref.num_registers + 1)
    written = {}

    def hook(module, inputs, output, block, indices):
        chosen = output[0][:, indices]
        if values == "sign_max":
            high, low = torch.max(chosen), torch.min(chosen)
            value = high if abs(high) > abs(low) else low
        else:
            value = chosen[slot + 1 :].max(dim=0).values
        written[block] = value.clone()
        output[0, slot, indices] = value
        output[0, slot + 1 :, indices] = 0

    by_block = {}
    for n in neurons:
        by_block.setdefault(n.block, []).append(n.neuron)
    for block, indices in by_block.items():
        ref.blocks[block].mlp.act.register_forward_hook(
            lambda m, i, o, block=block, indices=indices: hook(m, i, o, block, indices)
        )
    with torch.no_grad():
        return ref(image[None], return_features=True), written


# ---------------------------------------------------------------------------------------------
# LOST


def test_lost_boxes_equal_the_reference_on_random_features_ties_ordered_alike():
    gen = torch.Generator().manual_seed(0)
    grid, patch, size = (6, 9), 16, (90, 140)  # a 90x140 image padded to 96x144
    differ = 0
    for case in range(150):
        # Few dimensions and rounded values: many patches of equal degree.
        features = torch.randn(54, 3, generator=gen).round(decimals=1).double()
        features[features.abs().sum(dim=1) == 0] = 0.1  # a zero vector has no seed in LOST
        k = (5, 20, 100)[case % 3]
        for ties, stable in (("reference", False), ("stable", True)):
            box, seed = lost_box(features, grid, patch, k, ties=ties, image_size=size)
            expected, expected_seed = reference_lost_box(features, grid, patch, k, size, stable)
            assert box.tolist() == expected, (case, ties)
            assert seed == expected_seed
        stable_box, _ = lost_box(features, grid, patch, k, image_size=size)
        reference_box, _ = lost_box(features, grid, patch, k, ties="reference", image_size=size)
        differ += not torch.equal(stable_box, reference_box)
    assert differ > 10  # the order of ties matters: both orders are checked above


def test_padding_to_a_patch_multiple_and_boxes_clipped_to_the_image():
    image = torch.randn(3, 45, 70)
    padded = pad_to_patches(image, 8)
    assert padded.shape == (3, 48, 72)
    assert torch.equal(padded[:, :45, :70], image)
    assert padded[:, 45:].abs().sum() == 0 and padded[:, :, 70:].abs().sum() == 0
    assert pad_to_patches(padded, 8).shape == padded.shape

    torch.manual_seed(0)
    model = RegisterViT("vit_tiny", img_size=32, patch_size=8, depth=2, num_registers=1).eval()
    seen = []
    model.patch_embed.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    images = [torch.randn(3, 45, 70), torch.randn(3, 45, 70), torch.randn(3, 33, 20)]
    truth = [torch.tensor([[0.0, 0.0, 70.0, 45.0]]), torch.zeros(0, 4), torch.zeros(0, 4)]
    result = lost(model, images, truth, batch_size=4)
    # Images of one padded shape share a forward; each is run at its own padded size.
    assert [tuple(s) for s in seen] == [(2, 3, 48, 72), (1, 3, 40, 24)]
    assert result["sizes"] == [(45, 70), (45, 70), (33, 20)]
    boxes = result["boxes"]
    assert (boxes[:2, 2] <= 70).all() and (boxes[:2, 3] <= 45).all()
    assert (boxes[2, 2] <= 20).all() and (boxes[2, 3] <= 33).all()
    assert result["evaluated"] == 1


def test_corloc_denominator_counts_images_without_boxes_as_misses():
    truth = [
        torch.tensor([[0.0, 0.0, 10.0, 10.0]]),
        torch.tensor([[50.0, 50.0, 60.0, 60.0]]),
        torch.zeros(0, 4),
    ]
    predicted = torch.tensor([[0.0, 0.0, 10.0, 12.0], [0.0, 0.0, 10.0, 10.0], [0.0] * 4])
    assert corloc(predicted, truth) == 1 / 2
    assert corloc(predicted, truth, over="all") == 1 / 3
    assert corloc(predicted[2:], truth[2:]) is None
    assert corloc(predicted[2:], truth[2:], over="all") == 0.0


def test_iou_of_exactly_one_half_is_a_miss_with_the_reference_eps():
    box, truth = torch.tensor([0.0, 0.0, 16.0, 32.0]), torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    assert box_iou(box, truth).item() == 0.5
    assert 0.5 - 1e-8 < box_iou(box, truth, eps=1e-7).item() < 0.5
    assert corloc(box[None], [truth]) == 1.0
    assert corloc(box[None], [truth], eps=1e-7) == 0.0


def write_voc(root, images):
    """``images``: name -> (width, height, [(xmin, ymin, xmax, ymax, difficult, truncated)])."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    for name, (width, height, objects) in images.items():
        pixels = np.random.default_rng(len(name)).integers(0, 255, (height, width, 3), np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.png")
        xml = "".join(
            f"<object><difficult>{d}</difficult><truncated>{t}</truncated><bndbox>"
            f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
            "</object>"
            for x0, y0, x1, y1, d, t in objects
        )
        (root / "Annotations" / f"{name}.xml").write_text(f"<annotation>{xml}</annotation>")


def test_full_resolution_images_keep_their_size_boxes_and_hard_objects(tmp_path):
    write_voc(
        tmp_path,
        {
            "a": (70, 45, [(1, 1, 35, 45, 0, 0), (11, 6, 20, 10, 1, 0)]),
            "b": (40, 60, [(5, 5, 40, 60, 0, 1)]),
        },
    )
    data = load_images(tmp_path, 32, (0.5,) * 3, (0.25,) * 3, keep_originals=True)
    assert data.images.shape == (2, 3, 32, 32)
    assert data.sizes == [(45, 70), (60, 40)]
    assert [h.tolist() for h in data.hard] == [[False, True], [True]]
    torch.testing.assert_close(
        data.original_boxes[0], torch.tensor([[0.0, 0, 35, 45], [10, 5, 20, 10]])
    )
    full = list(data.full_resolution())
    assert [tuple(x.shape) for x in full] == [(3, 45, 70), (3, 60, 40)]
    with Image.open(tmp_path / "JPEGImages" / "a.png") as image:
        expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255 - 0.5) / 0.25
    torch.testing.assert_close(full[0], expected)
    square = data.to_square(torch.tensor([[7.0, 9.0, 35.0, 45.0], [4.0, 6.0, 20.0, 30.0]]))
    torch.testing.assert_close(square, torch.tensor([[3.2, 6.4, 16.0, 32.0], [3.2, 3.2, 16, 16]]))

    torch.manual_seed(0)
    model = RegisterViT("vit_tiny", img_size=32, patch_size=8, depth=2, num_registers=0).eval()
    reference = run_lost(model, data, AnalysisSettings(protocol="reference"))
    assert reference["sizes"] == data.sizes and reference["evaluated"] == 2
    assert reference["k"] == 100
    no_hard = run_lost(model, data, AnalysisSettings(protocol="reference", no_hard=True))
    assert no_hard["evaluated"] == 1  # "b" holds a truncated object only
    ours = run_lost(model, data, AnalysisSettings())
    assert ours["sizes"] == [(32, 32)] * 2 and ours["k"] is None


# ---------------------------------------------------------------------------------------------
# Test-time registers: each rule by hand


class HandMlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc2 = nn.Linear(width, 1, bias=False)
        self.fc2.weight.data = F.one_hot(torch.tensor([0]), width).float()


class HandBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = HandMlp(width)

    def forward(self, x):
        return self.mlp.fc2(x)


class HandBackbone(nn.Module):
    """One block whose MLP activations are the input itself, (B, T, H): the block writes
    neuron 0 alone into a one-channel residual stream, so a token's norm is |neuron 0|."""

    depth = 1
    num_prefix_tokens = 1

    def __init__(self, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([HandBlock(width)])

    def forward(self, x, return_features=False):
        out = self.blocks[0](x)
        return {
            "x_norm_clstoken": out[:, 0],
            "x_norm_regtokens": out[:, 1:1],
            "x_norm_patchtokens": out[:, 1:],
        }


def hand_activations():
    # Image A: patch 1 is the outlier (neuron 0 at 20); image B: [CLS] and all three patches.
    a = [[0, 0, 0], [20, 2, 0], [1, 0, 0], [1, 0, 0]]
    b = [[30, 0, 6], [20, 0, 0], [20, 4, 0], [20, 8, 0]]
    return torch.tensor([a, b], dtype=torch.float32)


@pytest.mark.parametrize(
    "tokens, average, sparsity, expected",
    [
        # Patches: 4 outlier positions; neuron 1 pooled (2 + 0 + 4 + 8) / 4, per image (2 + 4) / 2.
        ("patches", "pooled", False, [20.0, 3.5, 0.0]),
        ("patches", "per_image", False, [20.0, 3.0, 0.0]),
        # All tokens adds B's [CLS]: neuron 1 per image (2 + 12 / 4) / 2, neuron 2 (0 + 6 / 4) / 2.
        ("all", "pooled", False, [22.0, 2.8, 1.2]),
        ("all", "per_image", False, [21.25, 2.5, 0.75]),
        # Sparsity: neuron 0 is below 0.5 on under half of the tokens of both images.
        ("all", "per_image", True, [0.0, 2.5, 0.75]),
    ],
)
def test_neuron_scores_by_hand(tokens, average, sparsity, expected):
    backbone = HandBackbone(3)
    rule = OutlierRule("absolute", threshold=10.0)
    neurons = find_register_neurons(
        backbone,
        hand_activations(),
        3,
        rule,
        0,
        1,
        tokens=tokens,
        average=average,
        sparsity=sparsity,
    )
    scores = {n.neuron: n.score for n in neurons}
    assert [scores[i] for i in range(3)] == pytest.approx(expected)
    assert [n.score for n in neurons] == sorted(scores.values(), reverse=True)


def test_sign_max_over_tokens_and_neurons_by_hand():
    values = torch.tensor(
        [
            [[1.0, -2.0], [0.5, 1.5]],  # largest magnitude -2: kept with its sign
            [[3.0, 0.0], [-3.0, 1.0]],  # 3 and -3: the negative one, as the reference
            [[0.25, 0.5], [0.75, 0.125]],
        ]
    )
    assert sign_max(values).tolist() == [-2.0, -3.0, 0.75]


def test_layer_cap_keeps_neurons_of_the_blocks_up_to_it():
    model, images = planted_backbone(), redundant_images(32)
    capped = find_register_neurons(model, images, top_k=10, top_layer=0)
    assert len(capped) == 10 and {n.block for n in capped} == {0}
    uncapped = find_register_neurons(model, images, top_k=10, top_layer=1)
    assert (uncapped[0].block, uncapped[0].neuron) == (1, 5)
    assert {n.block for n in uncapped} <= {0, 1}
    assert max(n.block for n in find_register_neurons(model, images, top_k=10)) > 1


def test_register_neuron_search_by_model_family():
    def backbone(embed_dim, depth, patch_size, pre_norm):
        config = ViTConfig.resolve(
            arch="vit_base",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=8,
            patch_size=patch_size,
            pre_norm=pre_norm,
        )
        return SimpleNamespace(config=config, depth=depth)

    reference = AnalysisSettings(protocol="reference")
    clip = register_neuron_search(backbone(768, 12, 16, True), reference, "block06")
    assert (clip["rule"].kind, clip["rule"].threshold) == ("absolute", 30.0)
    assert (clip["layer"], clip["top_layer"], clip["top_k"]) == (11, 5, 10)
    assert (clip["tokens"], clip["average"], clip["sparsity"], clip["values"]) == (
        "all",
        "per_image",
        True,
        "sign_max",
    )
    dinov2 = register_neuron_search(backbone(1024, 24, 14, False), reference, "block10")
    assert dinov2["rule"].threshold == 150.0 and dinov2["family"] == "DINOv2 ViT-L/14"
    assert (dinov2["layer"], dinov2["top_layer"], dinov2["top_k"]) == (22, 17, 50)
    # Unknown models: the relative rule on all tokens, capped where high-norm patches appear.
    ours = register_neuron_search(backbone(64, 4, 8, False), reference, "block01")
    assert ours["family"] is None and (ours["rule"].kind, ours["rule"].factor) == ("relative", 3)
    assert (ours["layer"], ours["top_layer"], ours["top_k"]) == (3, 1, 10)
    given = AnalysisSettings(protocol="reference", ttr_threshold=75, ttr_top_layer=4, ttr_neurons=3)
    clip_75 = register_neuron_search(backbone(768, 12, 16, True), given, "block06")
    assert (clip_75["rule"].threshold, clip_75["top_layer"], clip_75["top_k"]) == (75, 4, 3)
    default = register_neuron_search(backbone(768, 12, 16, True), AnalysisSettings(), "block06")
    assert default["family"] is None and default["rule"] == AnalysisSettings().outlier_rule
    assert (default["layer"], default["top_layer"], default["top_k"]) == (11, 11, 10)
    assert (default["tokens"], default["average"], default["values"]) == (
        "patches",
        "pooled",
        "neuron_max",
    )


# ---------------------------------------------------------------------------------------------
# Test-time registers against the restated reference


def register_values(model, images):
    """The features of our model with a test-time register, and per block what its register
    neurons hold in that register as ``fc2`` reads them, (B, neurons)."""
    slot = model.num_prefix_tokens - 1
    written = {}

    def keep(block, indices):
        def hook(module, args):
            written[block] = args[0][:, slot, indices].clone()

        return hook

    for block in {n.block for n in model.test_time_neurons}:
        indices = [n.neuron for n in model.test_time_neurons if n.block == block]
        model.blocks[block].mlp.fc2.register_forward_pre_hook(keep(block, indices))
    with torch.no_grad():
        return model(images, return_features=True), written


def random_model(seed: int, registers: int) -> RegisterViT:
    torch.manual_seed(seed)
    return RegisterViT(
        "vit_tiny",
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=3,
        num_heads=2,
        num_registers=registers,
    ).eval()


@pytest.mark.parametrize(
    "model, layer, top_layer, top_k",
    [(planted_backbone(), -1, 1, 10), (random_model(1, 2), -2, 1, 12)],
    ids=["planted", "random"],
)
def test_register_neurons_and_written_values_equal_the_reference(model, layer, top_layer, top_k):
    images = redundant_images(12) if model.img_size[0] == 64 else torch.randn(12, 3, 32, 32)
    with torch.no_grad():
        kinds = token_norms(model, images, [layer])[f"block{layer % model.depth:02d}"]
    norms = torch.cat([kinds["cls"][:, None], kinds["registers"], kinds["patches"]], 1)
    threshold = norms.quantile(0.9).item()  # some tokens of most images
    expected = reference_register_neurons(model, images, threshold, layer, top_layer, top_k)
    neurons = find_register_neurons(
        model,
        images,
        top_k,
        OutlierRule("absolute", threshold),
        layer,
        batch_size=5,
        tokens="all",
        top_layer=top_layer,
        average="per_image",
        sparsity=True,
    )
    assert [(n.block, n.neuron) for n in neurons] == [(b, i) for b, i, _ in expected]
    assert [n.score for n in neurons] == pytest.approx([s for _, _, s in expected], rel=1e-5)
    assert len({n.block for n in neurons}) > 1  # values of several blocks below

    by_rule = {}
    for values in ("sign_max", "neuron_max"):
        ours, written = register_values(add_test_time_register(model, neurons, values), images[:4])
        by_rule[values] = written
        for i in range(4):
            features, reference_values = reference_test_time_register(
                model, neurons, images[i], values
            )
            for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens"):
                torch.testing.assert_close(ours[key][i], features[key][0], atol=1e-4, rtol=1e-4)
            for block, value in reference_values.items():
                torch.testing.assert_close(written[block][i], value.expand_as(written[block][i]))
    # The two rules write different values: the comparisons above tell them apart.
    assert any(
        not torch.allclose(by_rule["sign_max"][b], by_rule["neuron_max"][b]) for b in written
    )


def test_both_value_rules_remove_the_planted_outliers_under_the_reference_protocol():
    model, images = planted_backbone(), redundant_images(24)
    norms = patch_norms_by_layer(model, images)
    flags = OutlierRule().mask(norms["output"])
    assert flags.sum() == 24 * len(PLANTED) and norms["output"].max() > 150
    search = register_neuron_search(model, AnalysisSettings(protocol="reference"), "block01")
    assert search["top_layer"] == 1 and search["rule"].kind == "relative"
    neurons = find_register_neurons(
        model,
        images,
        search["top_k"],
        search["rule"],
        search["layer"],
        tokens=search["tokens"],
        top_layer=search["top_layer"],
        average=search["average"],
        sparsity=search["sparsity"],
    )
    assert (neurons[0].block, neurons[0].neuron) == (1, 5) and neurons[0].score > 10 * neurons[
        1
    ].score
    _, before = output_tokens(model, images)
    for values in ("sign_max", "neuron_max"):
        fixed = add_test_time_register(model, neurons, values)
        after = patch_norms_by_layer(fixed, images)["output"]
        assert after.max() < 150 and OutlierRule().mask(after).float().mean() < 0.005
        _, tokens = output_tokens(fixed, images, batch_size=7)
        cosine = F.cosine_similarity(before, tokens, dim=-1)
        assert cosine[~flags].mean() > 0.999
        with torch.no_grad():
            register = token_norms(fixed, images, [3])["block03"]["registers"][:, -1]
        assert register.min() > 150  # the outliers' content moved into the register


def test_the_protocol_is_named_custom_where_a_flag_overrides_it():
    assert AnalysisSettings().protocol_summary()["name"] == "ours"
    assert AnalysisSettings(protocol="reference").protocol_summary()["name"] == "reference"
    for override in (dict(lost_ties="stable"), dict(no_hard=True), dict(ttr_threshold=75.0)):
        summary = AnalysisSettings(protocol="reference", **override).protocol_summary()
        assert summary["name"] == "reference (custom)"
    overridden = AnalysisSettings(protocol="reference", lost_ties="stable").protocol_summary()
    assert (overridden["lost_ties"], overridden["lost_input"]) == ("stable", "padded")
    with pytest.raises(ValueError, match="ttr_values must be one of"):
        AnalysisSettings(ttr_values="max")

"""Each objective's transform gives the documented shapes and dtypes, batched by default_collate."""

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import default_collate

from lightning_registers.data import (
    BlockMaskGenerator,
    ClipTransform,
    EvalTransform,
    MultiCropTransform,
    ThreeAugment,
)
from lightning_registers.data.samples import MissingFieldError


@pytest.fixture(scope="module")
def samples(demo_shards):
    return list(
        wds.WebDataset(str(demo_shards / "val" / "demo-val-000000.tar"), shardshuffle=False)
    )[:4]


def batch_of(transform, samples):
    return default_collate([transform(s) for s in samples])


@pytest.mark.parametrize(
    "transform", [ThreeAugment(32, crop="src"), ThreeAugment(32), EvalTransform(32, crop_ratio=1.0)]
)
def test_supervised_batches(samples, transform):
    batch = batch_of(transform, samples)
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == [int(s["cls"]) for s in samples]


def test_eval_transform_normalizes_with_imagenet_statistics(samples):
    image = EvalTransform(32, crop_ratio=1.0)(samples[0])["image"]
    # A normalized image spans well beyond [0, 1].
    assert image.min() < -0.5 and image.max() > 1.0


def test_clip_batches_tokenize_captions_with_open_clip(samples):
    import open_clip

    batch = batch_of(ClipTransform(32, train=True), samples)
    assert batch["image"].shape == (4, 3, 32, 32)
    assert batch["text"].shape == (4, 77) and batch["text"].dtype == torch.int64
    expected = open_clip.get_tokenizer("ViT-B-16")([samples[0]["txt"].decode()])[0]
    torch.testing.assert_close(batch["text"][0], expected)


def test_multicrop_batches_with_ibot_masks(samples):
    torch.manual_seed(0)
    transform = MultiCropTransform(
        global_size=32,
        local_size=16,
        num_local_crops=3,
        patch_size=8,
        mask_probability=1.0,
        mask_ratio=(0.25, 0.5),
    )
    batch = batch_of(transform, samples)
    assert batch["global_crops"].shape == (4, 2, 3, 32, 32)
    assert batch["local_crops"].shape == (4, 3, 3, 16, 16)
    assert batch["masks"].shape == (4, 2, 16) and batch["masks"].dtype == torch.bool
    assert (batch["masks"].sum(-1) <= 8).all() and batch["masks"].any()


def test_masking_probability_zero_masks_nothing(samples):
    transform = MultiCropTransform(
        global_size=32, local_size=16, num_local_crops=0, patch_size=8, mask_probability=0.0
    )
    assert not transform(samples[0])["masks"].any()


def test_block_masks_stay_within_budget_and_form_blocks():
    torch.manual_seed(0)
    generator = BlockMaskGenerator((14, 14))
    counts = []
    for _ in range(50):
        mask = generator(60)
        assert mask.shape == (196,) and mask.dtype == torch.bool
        counts.append(int(mask.sum()))
    assert max(counts) <= 60 and sum(counts) / len(counts) > 45


def test_missing_field_names_sample_and_shard(samples):
    sample = dict(samples[0])
    del sample["cls"]
    with pytest.raises(MissingFieldError, match=r"val-00000000 .*demo-val-000000.tar .*label"):
        ThreeAugment(32)(sample)


def test_simple_random_crop_is_a_window_of_the_reflect_padded_resized_image():
    """DeiT-III's --src: Resize(short side) then RandomCrop(size, padding=4, reflect)."""
    torch.manual_seed(0)
    height, width = 32, 48  # already at the target short side: the resize keeps every pixel
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    image = torch.stack([rows * 6, cols * 5, torch.zeros_like(rows)]).to(torch.uint8)
    padded = F.pad(image[None].float(), (4, 4, 4, 4), mode="reflect")[0].to(torch.uint8)
    crop = ThreeAugment(32, crop="src").crop
    tops, lefts = set(), set()
    for _ in range(300):
        out = crop(image)
        assert out.shape == (3, 32, 32)
        matches = [
            (t, left)
            for t in range(0, 9)
            for left in range(0, 24 + 1)
            if torch.equal(out, padded[:, t : t + 32, left : left + 32])
        ]
        assert matches, "the crop is no window of the padded image"
        tops.add(matches[0][0])
        lefts.add(matches[0][1])
    assert tops == set(range(9)) and {0, 24} <= lefts  # every offset the padding allows
    # Reflect padding (edge not repeated): the padded image's first row is the original row 4.
    assert torch.equal(padded[:, 0, 4:-4], image[:, 4])


def _line_spread(blur, sigma: float) -> float:
    """Standard deviation in pixels of a blurred one-pixel vertical line (uint8, 255)."""
    image = torch.zeros(3, 9, 41, dtype=torch.uint8)
    image[:, :, 20] = 255
    profile = blur(image)[0, 4].double()
    x = torch.arange(41, dtype=torch.float64) - 20
    return float(((profile * x**2).sum() / profile.sum()).sqrt())


def test_pil_blur_has_the_radius_deit_draws_and_kernel5_cuts_it():
    """DeiT-III blurs with PIL's GaussianBlur(radius), radius ~ U(0.1, 2): a spread of about the
    radius; torchvision's 5 px kernel cuts sigma 2 to about 1.3 px."""
    from torchvision.transforms import v2

    from lightning_registers.data.transforms import PILGaussianBlur

    assert _line_spread(PILGaussianBlur((2.0, 2.0)), 2.0) == pytest.approx(2.0, abs=0.15)
    assert _line_spread(PILGaussianBlur((1.0, 1.0)), 1.0) == pytest.approx(1.0, abs=0.15)
    kernel5 = v2.GaussianBlur(kernel_size=5, sigma=(2.0, 2.0))
    assert _line_spread(kernel5, 2.0) == pytest.approx(1.29, abs=0.05)
    blur = ThreeAugment(32, blur="pil").transform.transforms[2].transforms[2]
    assert isinstance(blur, PILGaussianBlur) and blur.radius == (0.1, 2.0)
    with pytest.raises(ValueError, match="blur"):
        ThreeAugment(32, blur="box")


def test_stratified_masks_mask_exactly_half_the_crops_with_spread_ratios():
    """DINOv2's collate: int(n x p) crops masked, the i-th with a ratio in the i-th slice."""
    from lightning_registers.data.masking import stratified_masks

    torch.manual_seed(0)
    generator = BlockMaskGenerator((8, 8))
    bounds = torch.linspace(0.1, 0.5, 12 + 1).tolist()
    for _ in range(20):
        masks = stratified_masks(generator, 24, 0.5, (0.1, 0.5))
        assert masks.shape == (24, 64)
        counts = sorted(int(c) for c in masks.sum(-1) if c > 0)
        assert len(counts) == 12
        # The k-th smallest count is at most the k-th slice's top: int(64 x bounds[k + 1]).
        for k, count in enumerate(counts):
            assert count <= int(64 * bounds[k + 1])
        assert sum(counts) >= 0.8 * sum(int(64 * low) for low in bounds[:-1])


def test_multicrop_collate_draws_stratified_masks_for_the_batch(samples):
    torch.manual_seed(0)
    transform = MultiCropTransform(
        global_size=32, local_size=16, num_local_crops=1, patch_size=8, stratified_masks=True
    )
    items = [transform(s) for s in samples]
    assert not any(item["masks"].any() for item in items)  # drawn by the collate, not per crop
    batch = transform.collate(items)
    assert batch["masks"].shape == (4, 2, 16) and int(batch["masks"].any(-1).sum()) == 4
    assert batch["global_crops"].shape == (4, 2, 3, 32, 32)

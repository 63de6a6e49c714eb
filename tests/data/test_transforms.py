"""Each objective's transform gives the documented shapes and dtypes, batched by default_collate;
the per-sample path is torchvision's composition; JPEGs are decoded reduced where crops allow."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image, JpegImagePlugin
from torch.utils.data import default_collate
from torchvision.transforms import v2

from lightning_registers.data import (
    BlockMaskGenerator,
    ClipTransform,
    EvalTransform,
    MultiCropTransform,
    ThreeAugment,
)
from lightning_registers.data.samples import MissingFieldError, decode_image, open_image


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


def _jpeg(width: int, height: int) -> bytes:
    """A JPEG of a colour gradient with a dark square: detail a reduced decode must keep."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = np.concatenate([x + 0 * y, 0 * x + y, 255 - (x + y) / 2], axis=2)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = 20
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_a_large_jpeg_is_decoded_reduced_for_small_crops_and_crops_keep_their_size(monkeypatch):
    """2000x1500 for 64 px global crops (area >= 0.32) and 32 px local ones (area >= 0.05):
    the smallest local region has a short side of sqrt(0.05 x 3e6 x 3/4) = 335 px, 2 x 32 px
    after a reduction by 5.2; global: 849 px, 2 x 64 px after 6.6. So 1/4: 500x375."""
    asked = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(self, mode, size):
        asked.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    data = _jpeg(2000, 1500)
    transform = MultiCropTransform(64, 32, num_local_crops=2, patch_size=8)
    assert transform.draft_scale(2000, 1500) == 4
    out = transform({"jpg": data, "__key__": "big"})
    assert asked == [(500, 375)]
    assert out["global_crops"].shape == (2, 3, 64, 64)
    assert out["local_crops"].shape == (2, 3, 32, 32)
    reduced = open_image(data, transform.draft_scale)
    assert reduced.size == (500, 375)
    # The same picture: the full decode shrunk 4x by area averaging is within a few levels.
    full = Image.open(io.BytesIO(data)).convert("RGB").reduce(4)
    assert np.abs(np.asarray(reduced, float) - np.asarray(full, float)).mean() < 2.0
    # Paper sizes on 500x375 scenes leave no room: 224 px crops need regions of 448 px.
    assert MultiCropTransform(224, 98).draft_scale(500, 375) == 1
    assert ThreeAugment(224, crop="src").draft_scale(500, 375) == 1
    # The short side is the region of the simple random crop: 1500 / 3 >= 2 x 224.
    assert ThreeAugment(224, crop="src").draft_scale(2000, 1500) == 2
    assert ThreeAugment(64, crop="rrc").draft_scale(2000, 1500) == 2  # 0.08: 424 px / 128


def test_an_odd_sided_jpeg_gets_the_reduction_asked_for():
    """Pillow reduces by the largest s within side // asked: asking for the rounded-up half of
    751 (376) would give s = 1."""
    assert open_image(_jpeg(1001, 751), lambda w, h: 2).size == (501, 376)
    assert open_image(_jpeg(1001, 751)).size == (1001, 751)


def _crop_kind(size: int, scale: tuple[float, float], *photometric) -> v2.Compose:
    normalize = v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomApply([v2.Grayscale(3)], p=0.2),
            *photometric,
            v2.ToDtype(torch.float32, scale=True),
            normalize,
        ]
    )


def test_per_sample_multicrop_is_dinov2s_composition_in_torchvision(samples):
    """With the same seed, each crop is torchvision's RandomResizedCrop, flip, jitter (p 0.8),
    grayscale (p 0.2), blur (p 1.0 / 0.1 / 0.5), solarize (second global crop, p 0.2) and
    normalization, local crops first, as the transform documents."""
    blur = v2.GaussianBlur(9, (0.1, 2.0))
    global1 = _crop_kind(32, (0.32, 1.0), blur)
    global2 = _crop_kind(
        32, (0.32, 1.0), v2.RandomApply([blur], p=0.1), v2.RandomSolarize(128, p=0.2)
    )
    local = _crop_kind(16, (0.05, 0.32), v2.RandomApply([blur], p=0.5))
    transform = MultiCropTransform(32, 16, num_local_crops=3, patch_size=8)
    for seed in range(3):
        torch.manual_seed(seed)
        out = transform(samples[0])
        torch.manual_seed(seed)
        image = v2.functional.to_image(decode_image(samples[0]))
        expected_local = torch.stack([local(image) for _ in range(3)])
        expected_global = torch.stack([global1(image), global2(image)])
        torch.testing.assert_close(out["local_crops"], expected_local, atol=0, rtol=0)
        torch.testing.assert_close(out["global_crops"], expected_global, atol=0, rtol=0)


def test_reflect_pad_crop_is_torchvisions_random_crop_draw_for_draw():
    from torchvision import tv_tensors

    from lightning_registers.data.transforms import ReflectPadCrop

    theirs = v2.RandomCrop(32, padding=4, padding_mode="reflect")
    for shape in ((3, 32, 48), (3, 48, 32), (3, 32, 32)):
        image = tv_tensors.Image(torch.randint(0, 256, shape, dtype=torch.uint8))
        for seed in range(30):
            torch.manual_seed(seed)
            ours = ReflectPadCrop(32, 4)(image)
            torch.manual_seed(seed)
            assert torch.equal(ours, theirs(image)) and isinstance(ours, tv_tensors.Image)

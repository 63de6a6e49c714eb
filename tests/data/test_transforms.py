"""Each objective's transform gives the documented shapes and dtypes, batched by default_collate."""

import pytest
import torch
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

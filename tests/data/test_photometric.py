"""Photometric augmentations batched on the training device: each op equals torchvision's (or
PIL's) for the same draws, the batched and per-sample paths give the same statistics, and DINO
and supervised runs train with ``photometric_on_device``."""

import lightning as L
import numpy as np
import pytest
import torch
from demo_run import DINO_TINY, demo_datamodule, quiet_trainer
from PIL import ImageFilter
from torch.utils.data import default_collate
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from lightning_registers.data import MultiCropTransform, ThreeAugment
from lightning_registers.data.photometric import (
    PHOTOMETRIC,
    Photometric,
    PhotometricStage,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
    grayscale,
    pack,
    pil_gaussian_blur,
    solarize,
    unpack,
)
from lightning_registers.data.transforms import (
    DINO_ORDER,
    THREE_AUGMENT_ORDER,
    PILGaussianBlur,
    per_sample_photometric,
)
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import DinoModule, SupervisedModule

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def colour_images(n: int, size: int = 24, seed: int = 0) -> torch.Tensor:
    """uint8 images (n, 3, size, size): smooth colour gradients with a bright square and a
    patch of noise, so that every op changes them, with grey pixels and saturated ones."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    images = []
    for _ in range(n):
        a, b = torch.rand(2, 3, 1, 1, generator=g)
        image = a * ramp.view(1, -1, 1) + b * ramp.view(1, 1, -1)
        image = image / image.amax().clamp(min=1e-3)
        image[:, 4:10, 4:10] = torch.rand(3, 1, 1, generator=g)
        image[:, -8:, -8:] = torch.rand(3, 8, 8, generator=g)
        image[:, :3, -3:] = 0.5  # grey
        images.append(image)
    return (torch.stack(images) * 255).round().to(torch.uint8)


# --- same output for the same draws ---------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs, low, high",
    [
        (adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        (adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        (adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
        (adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_each_jitter_op_equals_torchvision_with_each_crops_factor(ours, theirs, low, high):
    images = colour_images(16).float() / 255
    factors = torch.linspace(low, high, 16)
    expected = torch.stack([theirs(x, float(f)) for x, f in zip(images, factors, strict=True)])
    torch.testing.assert_close(ours(images, factors), expected, atol=1e-5, rtol=0)


def test_grayscale_solarize_and_blur_equal_torchvision():
    images = colour_images(8).float() / 255
    torch.testing.assert_close(grayscale(images), TF.rgb_to_grayscale(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(solarize(images), TF.solarize(images, 128 / 255))
    sigma = torch.linspace(0.1, 2.0, 8)
    for kernel in (5, 9):
        expected = torch.stack(
            [
                TF.gaussian_blur(x, [kernel, kernel], [float(s)])
                for x, s in zip(images, sigma, strict=True)
            ]
        )
        torch.testing.assert_close(
            gaussian_blur(images, sigma, kernel), expected, atol=1e-5, rtol=0
        )


def test_pil_blur_is_pils_box_blurs_up_to_its_8_bit_rounding():
    images = colour_images(6, size=40)
    radius = torch.tensor([0.1, 0.5, 1.0, 1.37, 1.8, 2.0])
    ours = pil_gaussian_blur(images.float(), radius)
    for image, r, out in zip(images, radius, ours, strict=True):
        blurred = TF.to_pil_image(image).filter(ImageFilter.GaussianBlur(float(r)))
        pil = torch.from_numpy(np.array(blurred)).permute(2, 0, 1).float()
        # PIL rounds to 8 bits after each of its 6 passes: at most 3 levels apart.
        assert (out - pil).abs().max() <= 3.0
        assert (out - pil).abs().mean() <= 1.0
    # A Gaussian of that radius: a line spreads by the radius (variance preserved exactly).
    line = torch.zeros(1, 3, 9, 61)
    line[..., 30] = 1.0
    profile = pil_gaussian_blur(line, torch.tensor([2.0]))[0, 0, 4].double()
    x = torch.arange(61, dtype=torch.float64) - 30
    assert float((profile * x**2).sum().sqrt()) == pytest.approx(2.0, abs=1e-4)


def test_the_full_chain_applies_each_crops_draws_in_its_order_as_torchvision():
    """Every crop through jitter (its own order of the four ops), grayscale, blur, solarize and
    normalization, against torchvision's functional ops one crop at a time."""
    n = 24
    images = colour_images(n)
    torch.manual_seed(0)
    params = Photometric(
        jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.3, blur_p=0.5, solarize_p=0.5
    ).draw(n)
    params["order"][:2] = torch.tensor([[3, 2, 1, 0], [0, 1, 2, 3]])
    params["jitter"][:2] = True
    assert len({tuple(o) for o in params["order"].tolist()}) > 5  # many orders in the batch
    stage = PhotometricStage(DINO_ORDER, 9, MEAN, STD)
    jitter = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected, at_threshold = [], []
    for i, image in enumerate(images):
        x = image.float() / 255
        if params["jitter"][i]:
            for op in params["order"][i].tolist():
                x = jitter[op](x, float(params["factors"][i, op]))
        if params["grayscale"][i]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if params["blur"][i]:
            x = TF.gaussian_blur(x, [9, 9], [float(params["sigma"][i])])
        # Rounding may put a value this close to the threshold on either side of it.
        at_threshold.append((x - 128 / 255).abs() < 1e-5 if params["solarize"][i] else x < -1)
        if params["solarize"][i]:
            x = TF.solarize(x, 128 / 255)
        expected.append(TF.normalize(x, MEAN, STD))
    kept = ~torch.stack(at_threshold)
    assert kept.float().mean() > 0.99
    ours = stage.apply(images, params)
    torch.testing.assert_close(ours[kept], torch.stack(expected)[kept], atol=1e-5, rtol=0)


# --- same statistics ------------------------------------------------------------------------


def count_calls(monkeypatch, cls, method: str = "transform") -> list:
    """A list that grows by one at each call of ``cls.method`` (once per image)."""
    calls = []
    original = getattr(cls, method)

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(cls, method, counted)
    return calls


def _per_crop_stats(images: torch.Tensor) -> torch.Tensor:
    """(N, 6): each crop's channel means and channel standard deviations."""
    return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance of two 1D samples."""
    values = torch.cat([a, b]).sort().values
    cdf_a = torch.searchsorted(a.sort().values, values, right=True) / len(a)
    cdf_b = torch.searchsorted(b.sort().values, values, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


KINDS = {
    "dino global 1": (MultiCropTransform().photometric["global1"], DINO_ORDER, 9),
    "dino global 2": (MultiCropTransform().photometric["global2"], DINO_ORDER, 9),
    "dino local": (MultiCropTransform().photometric["local"], DINO_ORDER, 9),
    "3-augment": (ThreeAugment().photometric, THREE_AUGMENT_ORDER, 5),
    "3-augment, PIL blur": (ThreeAugment(blur="pil").photometric, THREE_AUGMENT_ORDER, "pil"),
}


@pytest.fixture
def one_thread():
    """Small per-image convolutions run far slower on threads that the machine is busy with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", list(KINDS))
def test_batched_and_per_sample_paths_give_the_same_statistics(monkeypatch, one_thread, kind):
    """On 1024 copies of 4 images, torchvision's per-sample ops and the batched stage give the
    same distribution of each crop's channel means and spreads (Kolmogorov-Smirnov distance
    below its 0.1 % critical value), the same batch mean and spread per channel, and apply
    grayscale, blur and solarization as often as each other and as drawn."""
    spec, order, blur = KINDS[kind]
    n = 1024
    images = colour_images(4, size=32).repeat(n // 4, 1, 1, 1)
    calls = {
        "jitter": count_calls(monkeypatch, v2.ColorJitter),
        "grayscale": count_calls(monkeypatch, v2.Grayscale),
        "solarize": count_calls(monkeypatch, v2.RandomSolarize),
        "blur": count_calls(monkeypatch, v2.GaussianBlur)
        if blur != "pil"
        else count_calls(monkeypatch, PILGaussianBlur, "__call__"),
    }
    torch.manual_seed(0)
    per_sample = v2.Compose(
        per_sample_photometric(spec, order, blur)
        + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    )
    ours = torch.stack([per_sample(image) for image in images])
    counts = {op: len(c) for op, c in calls.items()}
    params = spec.draw(n)
    batched = PhotometricStage(order, blur, MEAN, STD).apply(images, params)

    a, b = _per_crop_stats(ours), _per_crop_stats(batched)
    for column in range(a.shape[1]):
        assert _ks_distance(a[:, column], b[:, column]) < 0.086  # 1.95 sqrt(2 / n)
    error = (a[:, :3].var(0) / n + b[:, :3].var(0) / n).sqrt()
    assert ((ours.mean(dim=(0, 2, 3)) - batched.mean(dim=(0, 2, 3))).abs() < 4 * error).all()
    spread = ours.std(dim=(0, 2, 3))
    assert ((spread - batched.std(dim=(0, 2, 3))).abs() < 0.05 * spread).all()
    # Grey crops: R = G = B everywhere (the images themselves are coloured).
    grey_ours = ours * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    grey_ours = (grey_ours.amax(1) - grey_ours.amin(1)).amax(dim=(1, 2)) < 1e-5
    assert int(grey_ours.sum()) == counts["grayscale"]
    for op in ("grayscale", "blur", "solarize"):
        p = 1 / len(spec.one_of) if op in spec.one_of else getattr(spec, f"{op}_p")
        tolerance = 4 * (p * (1 - p) / n) ** 0.5 + 1e-9
        assert abs(counts[op] / n - p) <= tolerance, op
        assert abs(float(params[op].float().mean()) - p) <= tolerance, op
    p = spec.jitter_p if any(spec.jitter) else 0.0
    assert abs(counts["jitter"] / n - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-9
    assert abs(float(params["jitter"].float().mean()) - spec.jitter_p) <= 0.05


def test_draws_follow_torchvisions_ranges_one_of_chooses_exactly_one_and_pack_keeps_them():
    torch.manual_seed(0)
    draws = Photometric(jitter=(0.4, 0.3, 0.2, 0.1)).draw(20000)
    factors = draws["factors"]
    for column, (low, high) in enumerate([(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]):
        assert low <= factors[:, column].min() < low + 0.01
        assert high - 0.01 < factors[:, column].max() <= high
    # Every one of the 24 orders, each about equally often.
    counts = torch.unique(draws["order"], dim=0, return_counts=True)[1]
    assert len(counts) == 24 and counts.min() > 20000 / 24 * 0.8
    assert torch.equal(draws["order"].sort(1).values, torch.arange(4).expand(20000, 4))
    off = Photometric(jitter=(0.3, 0.3, 0.3, 0.0)).draw(100)["factors"]
    assert (off[:, 3] == 0).all()  # hue left out: its identity
    one_of = ThreeAugment().photometric.draw(3000)
    chosen = torch.stack([one_of[op] for op in ("grayscale", "solarize", "blur")])
    assert (chosen.sum(0) == 1).all()
    unpacked = unpack(pack(one_of))
    assert unpacked.keys() == one_of.keys()
    for key, value in one_of.items():
        assert torch.equal(unpacked[key], value), key
    with pytest.raises(ValueError, match="one_of"):
        Photometric(one_of=("hue",))
    with pytest.raises(ValueError, match="blur"):
        PhotometricStage(DINO_ORDER, 4, MEAN, STD)


# --- the transforms and the objectives with photometric_on_device -----------------------------


def test_on_device_transforms_give_uint8_crops_and_their_draws(demo_shards):
    import webdataset as wds

    samples = list(wds.WebDataset(str(demo_shards / "val" / "demo-val-000000.tar")))[:3]
    multicrop = MultiCropTransform(32, 16, num_local_crops=3, patch_size=8)
    on_device = MultiCropTransform(
        32, 16, num_local_crops=3, patch_size=8, photometric_on_device=True
    )
    assert multicrop.batch_stage is None
    batch = on_device.collate([on_device(s) for s in samples])
    assert batch["global_crops"].dtype == torch.uint8
    assert batch["global_crops"].shape == (3, 2, 3, 32, 32)
    drawn = batch[PHOTOMETRIC]  # packed: 13 numbers a crop
    assert drawn["global_crops"].shape == (3, 2, 13)
    assert drawn["local_crops"].shape == (3, 3, 13)
    params = unpack(drawn["global_crops"][:, 0])
    # The first global crop is always blurred and never solarized.
    assert params["blur"].all() and not params["solarize"].any()
    out = on_device.batch_stage(batch)
    assert PHOTOMETRIC not in out and out["global_crops"].dtype == torch.float32
    assert out["global_crops"].shape == (3, 2, 3, 32, 32)
    assert out["local_crops"].shape == (3, 3, 3, 16, 16)
    assert out["global_crops"].min() < -1.0 and out["global_crops"].max() > 1.0  # normalized
    single = ThreeAugment(32, crop="src", photometric_on_device=True)
    batch = default_collate([single(s) for s in samples])
    assert batch["image"].dtype == torch.uint8 and batch[PHOTOMETRIC]["image"].shape == (3, 13)
    assert unpack(batch[PHOTOMETRIC]["image"])["jitter"].all()
    assert single.batch_stage(batch)["image"].shape == (3, 3, 32, 32)


class RecordBatches(L.Callback):
    """What reaches the training step: the dtype of each image tensor and the batch's keys."""

    def __init__(self, key: str) -> None:
        self.key, self.seen = key, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append(
            (batch[self.key].dtype, PHOTOMETRIC in batch, float(batch[self.key].min()))
        )


def _backbone() -> RegisterViT:
    torch.manual_seed(0)
    return RegisterViT("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


@pytest.mark.parametrize(
    "objective, precision, dtype",
    [
        ("dino", "32-true", torch.float32),
        ("supervised", "32-true", torch.float32),
        # Lightning converts a "-true" batch before the transfer; the crops made after it too.
        ("supervised", "bf16-true", torch.bfloat16),
    ],
)
def test_runs_train_with_photometric_on_device(demo_shards, objective, precision, dtype):
    L.seed_everything(0)
    if objective == "dino":
        module = DinoModule(
            _backbone(), num_classes=10, image_size=32, photometric_on_device=True, **DINO_TINY
        )
        key = "global_crops"
    else:
        module = SupervisedModule(
            _backbone(), num_classes=10, image_size=32, blur="pil", photometric_on_device=True
        )
        key = "image"
    record = RecordBatches(key)
    trainer = quiet_trainer(
        max_steps=3, limit_val_batches=1, callbacks=[record], precision=precision
    )
    trainer.fit(module, datamodule=demo_datamodule(demo_shards, num_workers=1))
    assert trainer.global_step == 3
    assert [(d, carried) for d, carried, _ in record.seen] == [(dtype, False)] * 3
    assert min(low for *_, low in record.seen) < -1.0  # normalized on the device
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert module.hparams.photometric_on_device

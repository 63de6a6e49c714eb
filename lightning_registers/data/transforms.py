"""Per-objective sample transforms: raw webdataset sample in, dict of tensors out.

Any exception raised here (an image that does not decode, a missing field) makes the stream
skip and count the sample. Batches are made by the transform's ``collate`` where it has one
(DINOv2's batch-wise iBOT masks), else by ``torch.utils.data.default_collate``.
"""

from __future__ import annotations

import torch
from PIL import ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from .masking import BlockMaskGenerator, stratified_masks
from .samples import MissingFieldError, decode_caption, decode_image, decode_label

BICUBIC = v2.InterpolationMode.BICUBIC


def _normalize(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _optional_label(sample: dict) -> int:
    try:
        return decode_label(sample)
    except MissingFieldError:
        return -1


class EvalTransform:
    """Resize, centre crop and normalize: ``{"image", "label"}``; the label is required unless
    ``require_label`` is False (then -1 where absent)."""

    def __init__(
        self,
        image_size: int = 224,
        crop_ratio: float = 0.875,
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        require_label: bool = True,
    ) -> None:
        resize = int(round(image_size / crop_ratio))
        self.require_label = require_label
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(resize, interpolation=BICUBIC, antialias=True),
                v2.CenterCrop(image_size),
                *_normalize(mean, std),
            ]
        )

    def __call__(self, sample: dict) -> dict:
        label = decode_label(sample) if self.require_label else _optional_label(sample)
        return {"image": self.transform(decode_image(sample)), "label": label}


class PILGaussianBlur:
    """PIL's Gaussian blur with a radius (standard deviation, in pixels) drawn uniformly from
    ``radius``: DeiT-III's 3-Augment blur, on an image tensor."""

    def __init__(self, radius: tuple[float, float] = (0.1, 2.0)) -> None:
        self.radius = radius

    def __call__(self, image: torch.Tensor) -> tv_tensors.Image:
        low, high = self.radius
        radius = low + (high - low) * torch.rand(()).item()
        blurred = v2.functional.to_pil_image(image).filter(ImageFilter.GaussianBlur(radius))
        return tv_tensors.Image(v2.functional.pil_to_tensor(blurred))


BLURS = ("kernel5", "pil")


class ThreeAugment:
    """DeiT-III's 3-Augment: a crop, a flip, one of grayscale / solarization / blur, then colour
    jitter, normalization; ``{"image", "label"}``.

    Args:
        image_size: output side.
        crop: "src" (simple random crop: resize the short side, reflect-pad 4 px, random crop;
            DeiT-III's ``--src``, used on ImageNet-21k) or "rrc" (random resized crop with
            ``rrc_scale``; DeiT-III on ImageNet-1k).
        rrc_scale: area range of the random resized crop.
        color_jitter: brightness, contrast and saturation jitter strength (0 turns it off).
        blur: "kernel5" (torchvision's blur, 5 px kernel, sigma 0.1-2) or "pil" (PIL's
            Gaussian blur of radius 0.1-2 px, DeiT-III's; a 5 px kernel cuts the spread of
            sigma 2 to about 1.3 px).
    """

    def __init__(
        self,
        image_size: int = 224,
        crop: str = "rrc",
        rrc_scale: tuple[float, float] = (0.08, 1.0),
        color_jitter: float = 0.3,
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        blur: str = "kernel5",
    ) -> None:
        if crop == "src":
            crops = [
                v2.Resize(image_size, interpolation=BICUBIC, antialias=True),
                v2.RandomCrop(image_size, padding=4, padding_mode="reflect"),
            ]
        elif crop == "rrc":
            crops = [v2.RandomResizedCrop(image_size, scale=rrc_scale, interpolation=BICUBIC)]
        else:
            raise ValueError(f"crop must be 'src' or 'rrc', got {crop!r}")
        if blur not in BLURS:
            raise ValueError(f"blur must be one of {BLURS}, got {blur!r}")
        self.crop = v2.Compose([v2.ToImage(), *crops])
        one_of = v2.RandomChoice(
            [
                v2.Grayscale(num_output_channels=3),
                v2.RandomSolarize(threshold=128, p=1.0),
                v2.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))
                if blur == "kernel5"
                else PILGaussianBlur((0.1, 2.0)),
            ]
        )
        jitter = [v2.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
        self.transform = v2.Compose(
            [self.crop, v2.RandomHorizontalFlip(), one_of, *jitter, *_normalize(mean, std)]
        )

    def __call__(self, sample: dict) -> dict:
        label = decode_label(sample)
        return {"image": self.transform(decode_image(sample)), "label": label}


class ClipTransform:
    """open_clip's image transform and tokenizer: ``{"image", "text", "label"}`` (label -1 where
    the sample has none). The tokenizer is built lazily, once per worker."""

    def __init__(
        self,
        image_size: int = 224,
        train: bool = True,
        tokenizer: str = "ViT-B-16",
        context_length: int = 77,
    ) -> None:
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from open_clip.transform import image_transform

        self.transform = image_transform(
            image_size, is_train=train, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD
        )
        self.tokenizer_name = tokenizer
        self.context_length = context_length
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(
                self.tokenizer_name, context_length=self.context_length
            )
        return self._tokenizer

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, sample: dict) -> dict:
        text = self.tokenizer([decode_caption(sample)])[0]
        image = self.transform(decode_image(sample))
        return {"image": image, "text": text, "label": _optional_label(sample)}


class MultiCropTransform:
    """DINOv2's multi-crop with iBOT masks: ``{"global_crops": (2, 3, G, G), "local_crops":
    (n, 3, L, L), "masks": (2, patches) bool, "label"}`` (label -1 where absent).

    Args:
        global_size / local_size: crop sides.
        num_local_crops: local crops per image.
        global_scale / local_scale: area ranges of the random resized crops.
        patch_size: backbone patch size (sets the mask grid).
        mask_probability: chance that a global crop is masked at all; with
            ``stratified_masks``, the share of the batch's global crops that are masked.
        mask_ratio: range of the share of patches masked in a masked crop.
        blur_probabilities: chance of a blur on the first global crop, the second, and each
            local crop. DINOv2 means (1.0, 0.1, 0.5) but its ``GaussianBlur`` applies
            ``1 - p``: (0.0, 0.9, 0.5) is what its runs did.
        stratified_masks: masks drawn per batch in ``collate`` as DINOv2's collate does:
            exactly ``int(2B x mask_probability)`` global crops masked, their ratios spread
            evenly over ``mask_ratio``, in random order; else each crop draws on its own.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        num_local_crops: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        patch_size: int = 14,
        mask_probability: float = 0.5,
        mask_ratio: tuple[float, float] = (0.1, 0.5),
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
        blur_probabilities: tuple[float, float, float] = (1.0, 0.1, 0.5),
        stratified_masks: bool = False,
    ) -> None:
        if global_size % patch_size:
            raise ValueError(
                f"global_size {global_size} is not divisible by patch_size {patch_size}"
            )
        flip_jitter = [
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
        normalize = _normalize(mean, std)

        def blur(p: float):
            return v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)

        def crop(size: int, scale) -> list:
            return [v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC)]

        blur1, blur2, blur_local = blur_probabilities
        self.global1 = v2.Compose(
            [*crop(global_size, global_scale), *flip_jitter, blur(blur1), *normalize]
        )
        self.global2 = v2.Compose(
            [
                *crop(global_size, global_scale),
                *flip_jitter,
                blur(blur2),
                v2.RandomSolarize(128, p=0.2),
                *normalize,
            ]
        )
        self.local = v2.Compose(
            [*crop(local_size, local_scale), *flip_jitter, blur(blur_local), *normalize]
        )
        self.num_local_crops = num_local_crops
        grid = (global_size // patch_size, global_size // patch_size)
        self.masks = BlockMaskGenerator(grid)
        self.mask_probability = mask_probability
        self.mask_ratio = mask_ratio
        self.stratified_masks = stratified_masks

    def _mask(self) -> torch.Tensor:
        if self.stratified_masks:
            return torch.zeros(self.masks.num_patches, dtype=torch.bool)  # drawn in collate
        if torch.rand(()).item() >= self.mask_probability:
            return torch.zeros(self.masks.num_patches, dtype=torch.bool)
        low, high = self.mask_ratio
        ratio = low + (high - low) * torch.rand(()).item()
        return self.masks(int(ratio * self.masks.num_patches))

    def __call__(self, sample: dict) -> dict:
        image = decode_image(sample)
        local = [self.local(image) for _ in range(self.num_local_crops)]
        return {
            "global_crops": torch.stack([self.global1(image), self.global2(image)]),
            "local_crops": torch.stack(local) if local else torch.empty(0),
            "masks": torch.stack([self._mask(), self._mask()]),
            "label": _optional_label(sample),
        }

    def collate(self, samples: list[dict]) -> dict:
        """A batch of samples; with ``stratified_masks`` its masks drawn for the whole batch."""
        batch = default_collate(samples)
        if self.stratified_masks:
            masks = batch["masks"]
            drawn = stratified_masks(
                self.masks, masks.shape[0] * masks.shape[1], self.mask_probability, self.mask_ratio
            )
            batch["masks"] = drawn.reshape(masks.shape)
        return batch

"""Per-objective sample transforms: raw webdataset sample in, dict of tensors out.

Any exception raised here (an image that does not decode, a missing field) makes the stream
skip and count the sample. Batches are made by the transform's ``collate`` where it has one
(DINOv2's batch-wise iBOT masks), else by ``torch.utils.data.default_collate``.

The training transforms decode each image once, at 1/2, 1/4 or 1/8 of its size where every crop
still takes its pixels from a region at least twice its output side (``DraftScale``), and crop,
resize and augment it as uint8 tensors (torchvision.transforms.v2; a random resized crop crops
before it resizes). With ``photometric_on_device`` they stop after the crops and flips and draw
each crop's photometric parameters instead; the objective applies them to the batch on the
training device (``photometric.PhotometricStage``).
"""

from __future__ import annotations

import math

import torch
from PIL import ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import default_collate
from torchvision import tv_tensors
from torchvision.transforms import v2

from .masking import BlockMaskGenerator, stratified_masks
from .photometric import PHOTOMETRIC, Photometric, PhotometricStage, pack
from .samples import (
    MissingFieldError,
    decode_caption,
    decode_image,
    decode_image_tensor,
    decode_label,
)

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


class ReflectPadCrop(v2.RandomCrop):
    """torchvision's ``RandomCrop(size, padding, padding_mode="reflect")``, the same draws and
    pixels, reading the window through reflected row and column indices rather than padding
    the whole image first."""

    def __init__(self, size: int, padding: int) -> None:
        super().__init__(size, padding=padding, padding_mode="reflect")

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        left, top = params["padding"][:2]
        out = inpt
        # Columns first: a window within the image is a view; gathering along rows is cheap.
        for dim, start, length in (
            (-1, params["left"] - left, params["width"]),
            (-2, params["top"] - top, params["height"]),
        ):
            size = inpt.shape[dim]
            if 0 <= start and start + length <= size:
                out = out.narrow(dim, start, length)
                continue
            index = torch.arange(start, start + length).abs()  # reflected before the start
            index = torch.where(index >= size, 2 * (size - 1) - index, index)  # and past the end
            out = out.index_select(dim, index)
        out = out.contiguous()
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


BLURS = ("kernel5", "pil")
DINO_ORDER = ("jitter", "grayscale", "blur", "solarize")
"""DINOv2's photometric order: colour jitter, grayscale, blur, solarization."""
THREE_AUGMENT_ORDER = ("grayscale", "solarize", "blur", "jitter")
"""3-Augment's: one of grayscale / solarization / blur, then colour jitter."""


def _blur(kind: int | str, sigma: tuple[float, float]) -> v2.Transform | PILGaussianBlur:
    """torchvision's Gaussian blur with a ``kind`` px kernel, or PIL's ("pil")."""
    return PILGaussianBlur(sigma) if kind == "pil" else v2.GaussianBlur(kind, sigma=sigma)


def per_sample_photometric(
    photometric: Photometric, order: tuple[str, ...], blur: int | str
) -> list[v2.Transform]:
    """torchvision's transforms (uint8 in, uint8 out) for one kind of crop, ops in ``order``; an
    op with no chance is left out, ``one_of``'s ops are one ``RandomChoice``."""
    ops = {
        "jitter": v2.ColorJitter(*photometric.jitter) if any(photometric.jitter) else None,
        "grayscale": v2.Grayscale(num_output_channels=3),
        "blur": _blur(blur, photometric.blur_sigma),
        "solarize": v2.RandomSolarize(threshold=128, p=1.0),
    }
    transforms, chosen = [], False
    for name in order:
        if name in photometric.one_of:
            if not chosen:
                transforms.append(v2.RandomChoice([ops[op] for op in photometric.one_of]))
                chosen = True
            continue
        chance = getattr(photometric, f"{name}_p")
        if ops[name] is None or chance == 0:
            continue
        transforms.append(ops[name] if chance == 1 else v2.RandomApply([ops[name]], p=chance))
    return transforms


def _draft_side(area: float | None, width: int, height: int) -> float:
    """Shortest side of the smallest region of a ``width`` x ``height`` image that a crop takes:
    a random resized crop of at least ``area`` of the image and aspect ratio within 3/4..4/3
    (its fallback, the largest centre crop within those ratios, is no smaller), or the short
    side (``area`` None: the image resized by its short side, then cropped)."""
    short = min(width, height)
    if area is None:
        return short
    return min(math.sqrt(area * width * height * 3 / 4), short)


class DraftScale:
    """The JPEG reduction (1, 2, 4 or 8) a transform's crops allow: the largest at which every
    crop still takes its pixels from a region at least twice its output side, so that the
    reduced decode only saves the work of a larger downscale.

    Args:
        crops: (output side, smallest area fraction) of each kind of crop; an area fraction of
            None for a crop of the short side (resize, then crop).
    """

    def __init__(self, crops: list[tuple[int, float | None]]) -> None:
        self.crops = list(crops)

    def __call__(self, width: int, height: int) -> int:
        room = min(_draft_side(area, width, height) / (2 * side) for side, area in self.crops)
        return max((s for s in (1, 2, 4, 8) if s <= room), default=1)


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
        photometric_on_device: the sample path only decodes, crops and flips (uint8 images)
            and draws each image's photometric parameters (``photometric``); ``batch_stage``
            applies them and normalizes, batched, on the training device.
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
        photometric_on_device: bool = False,
    ) -> None:
        if crop == "src":
            crops = [
                v2.Resize(image_size, interpolation=BICUBIC, antialias=True),
                ReflectPadCrop(image_size, padding=4),
            ]
            self.draft_scale = DraftScale([(image_size, None)])
        elif crop == "rrc":
            crops = [v2.RandomResizedCrop(image_size, scale=rrc_scale, interpolation=BICUBIC)]
            self.draft_scale = DraftScale([(image_size, rrc_scale[0])])
        else:
            raise ValueError(f"crop must be 'src' or 'rrc', got {crop!r}")
        if blur not in BLURS:
            raise ValueError(f"blur must be one of {BLURS}, got {blur!r}")
        self.crop = v2.Compose(crops)
        self.photometric = Photometric(
            jitter=(color_jitter, color_jitter, color_jitter, 0.0),
            one_of=("grayscale", "solarize", "blur"),
        )
        kernel = 5 if blur == "kernel5" else "pil"
        steps = [self.crop, v2.RandomHorizontalFlip()]
        self.batch_stage = None
        if photometric_on_device:
            self.batch_stage = PhotometricStage(THREE_AUGMENT_ORDER, kernel, mean, std)
        else:
            steps += per_sample_photometric(self.photometric, THREE_AUGMENT_ORDER, kernel)
            steps += _normalize(mean, std)
        self.transform = v2.Compose(steps)

    def __call__(self, sample: dict) -> dict:
        label = decode_label(sample)
        image = tv_tensors.Image(decode_image_tensor(sample, self.draft_scale))
        out = {"image": self.transform(image), "label": label}
        if self.batch_stage is not None:
            out[PHOTOMETRIC] = {"image": pack(self.photometric.draw(1))[0]}
        return out


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
        photometric_on_device: the sample path only decodes, crops and flips (uint8 crops) and
            draws each crop's photometric parameters (``photometric``); ``batch_stage``
            applies them and normalizes, batched, on the training device.
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
        photometric_on_device: bool = False,
    ) -> None:
        if global_size % patch_size:
            raise ValueError(
                f"global_size {global_size} is not divisible by patch_size {patch_size}"
            )
        blur1, blur2, blur_local = blur_probabilities
        jitter = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2)
        self.photometric = {
            "global1": Photometric(**jitter, blur_p=blur1),
            "global2": Photometric(**jitter, blur_p=blur2, solarize_p=0.2),
            "local": Photometric(**jitter, blur_p=blur_local),
        }
        sizes = {"global1": global_size, "global2": global_size, "local": local_size}
        scales = {"global1": global_scale, "global2": global_scale, "local": local_scale}
        self.batch_stage = None
        if photometric_on_device:
            self.batch_stage = PhotometricStage(DINO_ORDER, 9, mean, std)
        self.crops = {}
        for name, photometric in self.photometric.items():
            steps = [
                v2.RandomResizedCrop(sizes[name], scale=scales[name], interpolation=BICUBIC),
                v2.RandomHorizontalFlip(),
            ]
            if not photometric_on_device:
                steps += per_sample_photometric(photometric, DINO_ORDER, 9)
                steps += _normalize(mean, std)
            self.crops[name] = v2.Compose(steps)
        self.draft_scale = DraftScale(
            [(global_size, global_scale[0]), (local_size, local_scale[0])]
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
        image = tv_tensors.Image(decode_image_tensor(sample, self.draft_scale))
        local = [self.crops["local"](image) for _ in range(self.num_local_crops)]
        out = {
            "global_crops": torch.stack(
                [self.crops["global1"](image), self.crops["global2"](image)]
            ),
            "local_crops": torch.stack(local) if local else torch.empty(0),
            "masks": torch.stack([self._mask(), self._mask()]),
            "label": _optional_label(sample),
        }
        if self.batch_stage is not None:
            first, second = (pack(self.photometric[g].draw(1)) for g in ("global1", "global2"))
            drawn = {"global_crops": torch.cat([first, second])}
            if local:
                drawn["local_crops"] = pack(self.photometric["local"].draw(self.num_local_crops))
            out[PHOTOMETRIC] = drawn
        return out

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

"""Decoding the fields of a raw webdataset sample; a missing or bad field names the sample and
shard.

Images are decoded as researchers expect from a photo viewer: EXIF orientation applied, 16-bit
and float images scaled from their value range to 8 bits, transparent pixels composited over
white, every other mode (palette, CMYK, LAB, ...) converted to RGB by Pillow; an animated image
gives its first frame. An image over ``MAX_PIXELS`` is decoded at 1/2, 1/4 or 1/8 of its size
where the format allows (JPEG), and refused otherwise, before its pixels are decoded. A caller
whose crops need fewer pixels (a training transform) may ask for a JPEG decoded reduced too, and
for the image as a uint8 tensor (``decode_image_tensor``).
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DRAFT_SCALES = (1, 2, 4, 8)
"""The reductions a JPEG decoder offers (1/s of each side)."""
MAX_PIXELS = 8192 * 8192
"""Largest image decoded (width x height, after JPEG reduction); larger ones are refused."""
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
"""Formats Pillow may open, whatever a member's extension says (none of them runs a program)."""
# A ``.cls`` is a decimal integer; "3.0" is taken as 3 (pandas writes an integer column with
# gaps as floats), any other fraction, sign or text is refused.
_LABEL = re.compile(rb"\s*(\d+)(?:\.0*)?\s*")
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
DraftScale = Callable[[int, int], int]
"""(width, height) of an encoded image -> the reduction s (1, 2, 4, 8) its user allows."""


class MissingFieldError(KeyError):
    """A sample lacks a field that the objective needs."""

    def __str__(self) -> str:
        return self.args[0]


def _where(sample: dict) -> str:
    return f"sample {sample.get('__key__')} in {sample.get('__url__')}"


def _field(sample: dict, keys: tuple[str, ...], what: str) -> bytes:
    for key in keys:
        if key in sample:
            return sample[key]
    raise MissingFieldError(f"{_where(sample)} has no {what} (looked for .{', .'.join(keys)})")


def _reduce(image: Image.Image, draft_scale: DraftScale | None = None) -> None:
    """Decode ``image`` (a JPEG) at 1/s of its size: s is the largest of 1, 2, 4, 8 that
    ``draft_scale(width, height)`` allows, or the least that fits ``MAX_PIXELS`` where that is
    larger; an image that no reduction fits is refused."""
    width, height = image.size
    jpeg = image.format in ("JPEG", "MPO")
    scale = draft_scale(width, height) if jpeg and draft_scale is not None else 1
    if width * height > MAX_PIXELS:
        fits = [s for s in DRAFT_SCALES if -(-width // s) * -(-height // s) <= MAX_PIXELS]
        if not (jpeg and fits):
            raise ValueError(
                f"image of {width}x{height} pixels exceeds the limit of {MAX_PIXELS} pixels "
                "(lightning_registers.data.samples.MAX_PIXELS)"
            )
        scale = max(scale, fits[0])
    if scale > 1:
        # Pillow takes the largest of 1, 2, 4, 8 within side // asked side: asking for the
        # rounded-up size would give an odd side the next smaller reduction.
        image.draft(None, (width // scale, height // scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, scaled from its value range: 16-bit integers (``I;16``, and
    ``I``, which Pillow uses for 16-bit data) from 0..65535, floats (``F``) from 0..1, both
    clipped; transparent pixels composited over white."""
    if image.mode in _SIXTEEN_BIT or image.mode == "F":
        top = 1.0 if image.mode == "F" else 65535.0
        values = np.asarray(image, dtype=np.float64) * (255.0 / top)
        image = Image.fromarray(np.clip(values.round(), 0, 255).astype(np.uint8), "L")
    if image.mode in ("La", "RGBa"):
        image = image.convert(image.mode.upper())
    if "A" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    return image.convert("RGB")


@contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """``data`` opened by Pillow (header read, pixels not yet decoded)."""
    with warnings.catch_warnings():
        # Our limit is below Pillow's decompression-bomb warning; JPEGs above it are reduced.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            yield image


def open_image(data: bytes, draft_scale: DraftScale | None = None) -> Image.Image:
    """The image encoded in ``data`` as RGB, upright, within ``MAX_PIXELS`` (see the module); a
    JPEG decoded at 1/s of its size where ``draft_scale(width, height)`` gives s > 1 (what the
    crops that follow allow)."""
    with _opened(data) as image:
        _reduce(image, draft_scale)
        return to_rgb(ImageOps.exif_transpose(image))


def open_image_tensor(data: bytes, draft_scale: DraftScale | None = None) -> torch.Tensor:
    """``open_image``'s pixels as a uint8 tensor (3, H, W). A colour or grayscale JPEG decoded
    at full size goes from libjpeg-turbo straight into the tensor (torchvision's
    ``decode_jpeg``, EXIF orientation applied: the same pixels without Pillow's copies);
    anything else goes through ``open_image``."""
    with _opened(data) as image:
        width, height = image.size
        direct = (
            image.format == "JPEG"
            and image.mode in ("RGB", "L")
            and width * height <= MAX_PIXELS
            and (draft_scale is None or draft_scale(width, height) == 1)
        )
    if direct:
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            return decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        except RuntimeError:
            pass  # open_image says what is wrong with it, in Pillow's words
    return torch.from_numpy(np.array(open_image(data, draft_scale))).permute(2, 0, 1)


def decode_image(sample: dict, draft_scale: DraftScale | None = None) -> Image.Image:
    """The sample's image as RGB (see ``open_image``)."""
    return open_image(_field(sample, IMAGE_KEYS, "image"), draft_scale)


def decode_image_tensor(sample: dict, draft_scale: DraftScale | None = None) -> torch.Tensor:
    """The sample's image as a uint8 tensor (3, H, W) (see ``open_image_tensor``)."""
    return open_image_tensor(_field(sample, IMAGE_KEYS, "image"), draft_scale)


def decode_label(sample: dict) -> int:
    """The sample's class label (``.cls``): a non-negative decimal integer, "3.0" read as 3."""
    data = _field(sample, ("cls",), "class label")
    match = _LABEL.fullmatch(data)
    if match is None:
        raise ValueError(
            f"{_where(sample)}: class label {data[:20]!r} is not a non-negative integer"
        )
    return int(match.group(1))


def check_label(sample: dict, num_classes: int) -> None:
    """Raise, naming the sample, unless its ``.cls`` (where it has one) is a label in
    ``[0, num_classes)``."""
    if "cls" not in sample:
        return
    label = decode_label(sample)
    if label >= num_classes:
        raise ValueError(
            f"{_where(sample)}: class label {label} is out of range for num_classes={num_classes}"
        )


def decode_caption(sample: dict) -> str:
    """The sample's caption (``.txt``)."""
    return _field(sample, ("txt",), "caption").decode("utf-8")


def decode_meta(sample: dict) -> dict:
    """The sample's metadata (``.json``: boxes, classes)."""
    return json.loads(_field(sample, ("json",), "metadata"))

"""Decoding the fields of a raw webdataset sample; a missing field names the sample and shard."""

from __future__ import annotations

import io
import json

from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class MissingFieldError(KeyError):
    """A sample lacks a field that the objective needs."""

    def __str__(self) -> str:
        return self.args[0]


def _field(sample: dict, keys: tuple[str, ...], what: str) -> bytes:
    for key in keys:
        if key in sample:
            return sample[key]
    raise MissingFieldError(
        f"sample {sample.get('__key__')} in {sample.get('__url__')} has no {what} "
        f"(looked for .{', .'.join(keys)})"
    )


def decode_image(sample: dict) -> Image.Image:
    """The sample's image as RGB."""
    data = _field(sample, IMAGE_KEYS, "image")
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def decode_label(sample: dict) -> int:
    """The sample's integer class label (``.cls``)."""
    return int(_field(sample, ("cls",), "class label"))


def decode_caption(sample: dict) -> str:
    """The sample's caption (``.txt``)."""
    return _field(sample, ("txt",), "caption").decode("utf-8")


def decode_meta(sample: dict) -> dict:
    """The sample's metadata (``.json``: boxes, classes)."""
    return json.loads(_field(sample, ("json",), "metadata"))

"""Decoding images and labels: value ranges, transparency, orientation, size limits, labels, and
the tensor decode."""

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import decode_jpeg

from lightning_registers.data import samples
from lightning_registers.data.samples import check_label, decode_label, open_image


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb(data: bytes) -> np.ndarray:
    image = open_image(data)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_sixteen_bit_png_keeps_its_value_range():
    values = np.array([[0, 257 * 100, 32768, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert Image.open(io.BytesIO(encode(image))).mode == "I;16"
    expected = np.round(values / 257.0).astype(int)  # 0, 100, 128, 255
    np.testing.assert_array_equal(rgb(encode(image)), np.repeat(expected[..., None], 3, -1))


def test_32_bit_integer_and_float_images_keep_their_value_range():
    ints = Image.fromarray(np.array([[0, 257 * 50, 70000, -5]], dtype=np.int32))
    assert ints.mode == "I"
    np.testing.assert_array_equal(rgb(encode(ints, "TIFF"))[0, :, 0], [0, 50, 255, 0])
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32))
    assert floats.mode == "F"
    np.testing.assert_array_equal(rgb(encode(floats, "TIFF"))[0, :, 0], [0, 128, 255, 255, 0])


def over_white(value: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    value, alpha = value.astype(float), alpha.astype(float)
    return value * alpha / 255 + 255 * (1 - alpha / 255)


def test_transparent_pixels_are_composited_over_white():
    gray = np.array([[100, 100, 100]], dtype=np.uint8)
    alpha = np.array([[0, 128, 255]], dtype=np.uint8)
    la = Image.fromarray(np.stack([gray, alpha], -1), "LA")
    np.testing.assert_allclose(rgb(encode(la))[0, :, 0], over_white(gray[0], alpha[0]), atol=1)
    rgba = Image.fromarray(np.array([[[200, 10, 30, 0], [200, 10, 30, 255]]], np.uint8), "RGBA")
    np.testing.assert_array_equal(
        rgb(encode(rgba, "WEBP", lossless=True))[0], [[255] * 3, [200, 10, 30]]
    )


def test_palette_image_with_a_transparent_index():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putdata([0, 1])
    data = encode(palette, transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    np.testing.assert_array_equal(rgb(data)[0], [[255, 255, 255], [0, 0, 255]])
    np.testing.assert_array_equal(rgb(encode(palette))[0], [[255, 0, 0], [0, 0, 255]])


def test_cmyk_jpeg_and_bilevel_png_become_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan or black: red
    np.testing.assert_allclose(rgb(encode(cmyk, "JPEG", quality=95))[8, 8], [255, 0, 0], atol=6)
    bilevel = Image.new("1", (4, 1))
    bilevel.putpixel((1, 0), 1)
    np.testing.assert_array_equal(rgb(encode(bilevel))[0, :, 0], [0, 255, 0, 0])


def test_exif_orientation_is_applied():
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[0, 0] = (255, 0, 0)  # the stored top-left pixel is red
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # the camera was turned: show rotated 90 degrees clockwise
    decoded = rgb(encode(image, exif=exif.tobytes()))
    np.testing.assert_array_equal(decoded, np.rot90(pixels, k=-1))
    assert decoded.shape == (3, 2, 3)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_image_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (4, 4), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(rgb(data)[0, 0], [255, 0, 0])


def test_an_oversized_png_is_refused_from_its_header():
    data = encode(Image.new("1", (12000, 12000)))  # 144 megapixels, a few kB compressed
    start = time.perf_counter()
    with pytest.raises(ValueError, match="12000x12000 pixels exceeds the limit of 67108864"):
        open_image(data)
    assert time.perf_counter() - start < 1.0  # refused before its pixels are decoded


def test_an_oversized_jpeg_is_decoded_reduced(monkeypatch):
    monkeypatch.setattr(samples, "MAX_PIXELS", 100 * 100)
    image = Image.new("RGB", (300, 200), (0, 0, 255))
    decoded = open_image(encode(image, "JPEG"))
    # 1/2 would give 150x100 > 10000 pixels; 1/4 is the least reduction that fits.
    assert decoded.size == (75, 50)
    np.testing.assert_allclose(np.asarray(decoded)[25, 37], [0, 0, 255], atol=3)
    with pytest.raises(ValueError, match="exceeds the limit"):
        open_image(encode(image, "PNG"))


def test_formats_that_run_programs_are_not_opened():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(UnidentifiedImageError):
        open_image(eps)


@pytest.mark.parametrize(
    ("raw", "label"),
    [(b"3", 3), (b"3.0", 3), (b" 7\n", 7), (b"03", 3), (b"12.00", 12)],
)
def test_labels_are_integers_and_integral_floats(raw, label):
    assert decode_label({"__key__": "k", "cls": raw}) == label


@pytest.mark.parametrize("raw", [b"-1", b"3.5", b"abc", b"", b"\xff", b"1e3", b"+2", b"nan"])
def test_other_labels_are_refused_naming_the_sample(raw):
    with pytest.raises(ValueError, match="sample k in s.tar: class label"):
        decode_label({"__key__": "k", "__url__": "s.tar", "cls": raw})


def test_labels_are_checked_against_the_number_of_classes():
    check_label({"cls": b"9"}, 10)
    check_label({}, 10)  # no label: nothing to check
    with pytest.raises(ValueError, match="class label 10 is out of range for num_classes=10"):
        check_label({"__key__": "k", "cls": b"10"}, 10)


def _photo(mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 96)
    pixels = np.stack(
        [
            x[None, :] + 0 * x[:72, None],
            x[:72, None] + 0 * x[None, :],
            0 * x[None, :] + 90 + 0 * x[:72, None],
        ],
        2,
    )
    pixels[20:40, 30:60] = rng.integers(0, 256, (20, 30, 3))
    return Image.fromarray(pixels.astype(np.uint8)).convert(mode)


def _rotated(image: Image.Image) -> dict:
    exif = image.getexif()
    exif[0x0112] = 6
    return {"exif": exif.tobytes()}


@pytest.mark.parametrize(
    "image, fmt, options, direct",
    [
        (_photo(), "JPEG", {"quality": 90}, True),
        (_photo(), "JPEG", {"quality": 75, "subsampling": 0, "progressive": True}, True),
        (_photo("L"), "JPEG", {}, True),
        (_photo(), "JPEG", _rotated(_photo()), True),
        (_photo("CMYK"), "JPEG", {}, False),
        (_photo("RGBA"), "PNG", {}, False),
    ],
)
def test_the_tensor_decode_has_the_pixels_of_the_image_decode(
    monkeypatch, image, fmt, options, direct
):
    """libjpeg-turbo straight into the tensor for plain JPEGs, Pillow for the rest: the same
    pixels either way."""
    calls = []
    monkeypatch.setattr(
        samples, "decode_jpeg", lambda *a, **k: calls.append(1) or decode_jpeg(*a, **k)
    )
    data = encode(image, fmt, **options)
    tensor = samples.open_image_tensor(data)
    assert tensor.dtype == torch.uint8 and tensor.shape[0] == 3
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), np.asarray(open_image(data)))
    assert bool(calls) == direct


def test_the_tensor_decode_of_a_reduced_or_broken_jpeg_is_the_image_decodes():
    data = encode(_photo(), "JPEG")
    reduced = samples.open_image_tensor(data, lambda w, h: 2)
    assert reduced.shape == (3, 36, 48)
    np.testing.assert_array_equal(
        reduced.permute(1, 2, 0).numpy(), np.asarray(open_image(data, lambda w, h: 2))
    )
    with pytest.raises(OSError, match="truncated"):
        samples.open_image_tensor(data[: len(data) // 2])

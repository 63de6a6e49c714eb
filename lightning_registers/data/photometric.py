"""Photometric augmentations of many crops at once, each crop with its own random parameters:
the colour jitter, grayscale, Gaussian blur and solarization of DINOv2's multi-crop and
DeiT-III's 3-Augment, then normalization, on whatever device the crops are on.

``Photometric.draw`` draws the parameters of n crops of one kind from the distributions of
torchvision's transforms. The data pipeline draws them with each sample (so that they follow
the data seed, as every other augmentation does) and ``PhotometricStage`` applies them to the
collated batch once it is on the training device. The ops work on float images in [0, 1] with
torchvision's formulas: blends with black, the mean luma and the luma for brightness, contrast
and saturation, a rotation of the HSV hue, ITU-R 601-2 luma weights for grayscale, a separable
Gaussian kernel with reflect padding for the blur (or PIL's three box blurs a direction), and
inversion from 128/255 up for solarization; for the same draws each equals torchvision's
functional op on a float image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PHOTOMETRIC = "photometric"
"""Batch key of the drawn parameters: ``{images key: packed parameters}`` (``pack``)."""
JITTER = ("brightness", "contrast", "saturation", "hue")
"""The colour-jitter ops as torchvision's ColorJitter numbers them (``order``, ``factors``)."""
IDENTITY = (1.0, 1.0, 1.0, 0.0)
"""The factor of each jitter op that leaves an image as it is."""
OPS = ("jitter", "grayscale", "blur", "solarize")
LUMA = (0.2989, 0.587, 0.114)
"""ITU-R 601-2 luma weights of R, G and B, as torchvision and PIL convert to grayscale."""
SOLARIZE_THRESHOLD = 128 / 255


def _each(factor: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """A per-crop factor (N,) shaped to scale images (N, C, H, W)."""
    return factor.to(images.dtype).view(-1, 1, 1, 1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _each(factor, images)
    return (f * images + (1 - f) * other).clamp(0, 1)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma (N, 1, H, W) of RGB images (N, 3, H, W)."""
    r, g, b = images.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each crop blended with black by its factor: torchvision's ``adjust_brightness``."""
    return (images * _each(factor, images)).clamp(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each crop blended with its mean luma: torchvision's ``adjust_contrast``."""
    return _blend(images, grayscale(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each crop blended with its luma: torchvision's ``adjust_saturation``."""
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each crop's HSV hue turned by its shift (a fraction of the circle): torchvision's
    ``adjust_hue``."""
    value, low = images.amax(1, keepdim=True), images.amin(1, keepdim=True)
    chroma = value - low
    saturation = chroma / torch.where(value > 0, value, 1.0)
    safe = torch.where(chroma > 0, chroma, 1.0)
    r, g, b = images.split(1, dim=1)
    # The sector of the largest channel, red taking ties first, then green.
    hue = torch.where(
        value == r,
        (g - b) / safe,
        torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = (hue / 6 + _each(shift, images)).remainder(1.0)
    # HSV to RGB: channel n (5, 3, 1 for R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1) with
    # k = (n + 6 h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    k = (n + 6 * hue).remainder(6.0)
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """Values from 128/255 up inverted: torchvision's ``solarize`` at threshold 128 of 255."""
    return torch.where(images >= SOLARIZE_THRESHOLD, 1 - images, images)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's 1D Gaussian kernels (N, size), one a standard deviation."""
    x = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - (size - 1) / 2
    kernels = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)
    return kernels / kernels.sum(1, keepdim=True)


def pil_box_kernels(radius: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """The box kernels (N, K) whose ``passes`` successive passes make PIL's
    ``GaussianBlur(radius)``: the fractional box radius r that gives the variance
    ``radius**2`` (Gwosdek et al., 2011, as Pillow's BoxBlur.c computes it); each box weighs
    1 / (2r + 1) within its integer radius and splits the rest between the two pixels beyond."""
    sigma2 = radius.double() ** 2 / passes
    whole = torch.floor((torch.sqrt(12 * sigma2 + 1) - 1) / 2)
    fraction = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2)
    fraction = fraction / (6 * (sigma2 - (whole + 1) ** 2))
    width = int(whole.max()) + 1  # half-width of the widest box
    offsets = torch.arange(-width, width + 1, dtype=sigma2.dtype, device=radius.device).abs()
    inner = 1 / (2 * (whole + fraction) + 1)
    edge = (1 - (2 * whole + 1) * inner) / 2
    whole, inner, edge = whole[:, None], inner[:, None], edge[:, None]
    box = torch.where(offsets <= whole, inner, torch.where(offsets == whole + 1, edge, 0.0))
    return box.to(radius.dtype)


def _filter(images: torch.Tensor, kernels: torch.Tensor, padding: str, dim: int) -> torch.Tensor:
    """Each crop (N, C, H, W) filtered along ``dim`` (-1: rows, -2: columns) by its own
    odd-length kernel (N, K), the border padded by ``padding``."""
    n, c, h, w = images.shape
    half = kernels.shape[1] // 2
    weight = kernels.to(images.dtype).repeat_interleave(c, 0)[:, None, None, :]
    pad = (half, half, 0, 0)
    if dim == -2:
        weight, pad = weight.transpose(2, 3), (0, 0, half, half)
    x = F.pad(images.reshape(1, n * c, h, w), pad, mode=padding)
    return F.conv2d(x, weight, groups=n * c).reshape(n, c, h, w)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's ``gaussian_blur`` (square kernel, reflect padding), a sigma a crop."""
    kernels = gaussian_kernels(sigma, kernel_size)
    return _filter(_filter(images, kernels, "reflect", -1), kernels, "reflect", -2)


def pil_gaussian_blur(images: torch.Tensor, radius: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """PIL's ``ImageFilter.GaussianBlur`` (box passes along rows, then along columns, each
    repeating the edge pixels), a radius a crop; PIL rounds to 8 bits after each pass, this
    does not."""
    boxes = pil_box_kernels(radius, passes)
    for dim in (-1, -2):
        for _ in range(passes):
            images = _filter(images, boxes, "replicate", dim)
    return images


def _on_rows(images: torch.Tensor, rows: torch.Tensor, op, *args: torch.Tensor) -> None:
    """``op`` applied in place to the crops where ``rows`` is True, each with its ``args``."""
    index = rows.nonzero().flatten()
    if len(index):
        images[index] = op(images[index], *(a[index] for a in args))


def _grayscale_rgb(images: torch.Tensor) -> torch.Tensor:
    return grayscale(images).expand_as(images)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@dataclass(frozen=True)
class Photometric:
    """The photometric augmentations of one kind of crop, as torchvision's transforms describe
    them; ``draw(n)`` gives the random parameters of n crops.

    Args:
        jitter: ColorJitter strengths of brightness, contrast, saturation and hue: factors
            uniform in [max(0, 1 - s), 1 + s] (hue: shifts uniform in [-s, s]); 0 leaves the op
            out.
        jitter_p: chance that the colour jitter applies (RandomApply).
        grayscale_p / blur_p / solarize_p: chance of each op.
        blur_sigma: range of the blur's standard deviation in pixels (uniform).
        one_of: ops of which exactly one applies, each with the same chance (RandomChoice);
            their own chances are then not used.
    """

    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 1.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    one_of: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.one_of) - {"grayscale", "blur", "solarize"})
        if unknown:
            raise ValueError(f"Photometric.one_of takes grayscale, blur, solarize; got {unknown}")

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        """Parameters of ``n`` crops: ``order`` (n, 4), each crop's random order of the
        ``JITTER`` ops; ``factors`` (n, 4), their factors in ``JITTER``'s order (``IDENTITY``
        for an op left out); ``jitter``, ``grayscale``, ``blur``, ``solarize`` (n,), whether
        each applies; ``sigma`` (n,), the blur's standard deviation."""
        b, c, s, h = self.jitter
        low = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        high = torch.tensor([1 + b, 1 + c, 1 + s, h])  # an op left out: low = high = identity
        u = torch.rand(n, 14)  # one uniform number a parameter, drawn at once
        sigma_low, sigma_high = self.blur_sigma
        params = {
            "order": u[:, 4:8].argsort(dim=1),
            "factors": low + (high - low) * u[:, :4],
            "jitter": u[:, 8] < self.jitter_p,
            "sigma": sigma_low + (sigma_high - sigma_low) * u[:, 9],
            "grayscale": u[:, 10] < self.grayscale_p,
            "blur": u[:, 11] < self.blur_p,
            "solarize": u[:, 12] < self.solarize_p,
        }
        if self.one_of:
            choice = (u[:, 13] * len(self.one_of)).long().clamp(max=len(self.one_of) - 1)
            for i, op in enumerate(self.one_of):
                params[op] = choice == i
        return params


_LAYOUT = {
    "order": 4,
    "factors": 4,
    "sigma": 1,
    "jitter": 1,
    "grayscale": 1,
    "blur": 1,
    "solarize": 1,
}
_FLAGS = ("jitter", "grayscale", "blur", "solarize")


def pack(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """``draw``'s parameters of n crops as one float tensor (n, 13), the form a batch carries
    them in: one tensor to collate and send rather than seven."""
    return torch.cat([params[key].float().reshape(-1, width) for key, width in _LAYOUT.items()], 1)


def unpack(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """``pack``'s tensor (n, 13) as ``draw``'s parameters (float32, whatever precision the
    batch was converted to)."""
    parts = packed.float().split(list(_LAYOUT.values()), dim=1)
    params = dict(zip(_LAYOUT, parts, strict=True))
    params["order"] = params["order"].long()
    params["sigma"] = params["sigma"][:, 0]
    for key in _FLAGS:
        params[key] = params[key][:, 0] > 0.5
    return params


class PhotometricStage:
    """Applies drawn parameters (``Photometric.draw``) to uint8 crops: each op of ``order`` to
    the crops drawn for it, then normalization; normalized float32 crops out. A batch carries
    the parameters packed (``pack``) under ``PHOTOMETRIC``.

    Args:
        order: the ops in the order applied, names from ``OPS``.
        blur: kernel side of torchvision's GaussianBlur (odd), or "pil": PIL's GaussianBlur
            (the drawn sigma is its radius).
        mean / std: per-channel normalization.
    """

    def __init__(
        self,
        order: tuple[str, ...],
        blur: int | str,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        unknown = sorted(set(order) - set(OPS))
        if unknown:
            raise ValueError(f"order takes ops from {OPS}, got {unknown}")
        if blur != "pil" and not (isinstance(blur, int) and blur % 2 == 1):
            raise ValueError(f"blur must be an odd kernel side or 'pil', got {blur!r}")
        self.order = tuple(order)
        self.blur_kind = blur
        self.mean = tuple(mean)
        self.std = tuple(std)

    def blur(self, images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.blur_kind == "pil":
            return pil_gaussian_blur(images, sigma)
        return gaussian_blur(images, sigma, self.blur_kind)

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Crops (N, 3, H, W), uint8, augmented by their parameters and normalized."""
        x = images.to(torch.float32).mul_(1 / 255)
        for op in self.order:
            if op == "jitter":
                self._jitter(x, params["order"], params["factors"], params["jitter"])
            elif op == "grayscale":
                _on_rows(x, params["grayscale"], _grayscale_rgb)
            elif op == "blur":
                _on_rows(x, params["blur"], self.blur, params["sigma"])
            else:
                _on_rows(x, params["solarize"], solarize)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    @staticmethod
    def _jitter(
        x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, applied: torch.Tensor
    ) -> None:
        """ColorJitter in place: at each of the four steps, the op each crop's order puts there
        (an op at its identity factor is left out, as torchvision leaves out a disabled one)."""
        for step in range(len(JITTER)):
            for index, op in enumerate(_JITTER_OPS):
                rows = applied & (order[:, step] == index) & (factors[:, index] != IDENTITY[index])
                _on_rows(x, rows, op, factors[:, index])

    def __call__(self, batch: dict) -> dict:
        """``batch`` with the crops of every key under ``PHOTOMETRIC`` augmented by their packed
        parameters and normalized (any leading shape: (B, 3, H, W), (B, n, 3, H, W)), and
        ``PHOTOMETRIC`` removed."""
        batch = dict(batch)
        for key, packed in batch.pop(PHOTOMETRIC).items():
            images = batch[key]
            lead = images.dim() - 3
            params = unpack(packed.flatten(0, lead - 1))
            batch[key] = self.apply(images.flatten(0, lead - 1), params).view(images.shape)
        return batch

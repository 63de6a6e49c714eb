"""Object discovery with LOST (Siméoni et al., 2021) and its CorLoc against ground-truth boxes.

LOST on one image: the patches' last-block keys (or values/queries, heads concatenated) form a
Gram matrix; a patch's degree is the number of other patches it correlates positively with; the
seed is the patch of lowest degree; the seed is expanded to those of the ``k`` lowest-degree
patches positively correlated with it; a patch belongs to the object when its summed
correlation to that set is positive, and the box is the bounding box of the 4-connected
component holding the seed. Written out here because LOST is not a package; the steps follow
the authors' code (valeoai/LOST), which runs each image at full resolution, zero-padded at the
bottom and right to a multiple of the patch size, and clips the box to the image.

Choices where the reference code leaves something open or where we offer more:

- ``ties``: patches of equal degree are ordered ``stable`` (lowest index first, the same on
  every device) or as the reference orders them (``reference``: ``torch.argsort`` of the
  negated degree, descending, an unstable sort whose order depends on the device);
- ``corloc_over``: CorLoc over the images with boxes (``boxed``) or over ``all`` images, an
  image without boxes being a miss (the reference counts every image it runs, unless
  ``--no_hard`` drops the images left without boxes).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.patches import Patch
from torch import nn

from ..measures.figures import display_images, plt
from .figure_style import save
from .tokens import Images, batches, device_of, observe

FEATURES = ("keys", "values", "queries")
TIES = ("stable", "reference")
LOST_INPUTS = ("square", "padded")
CORLOC_OVER = ("boxed", "all")


def qkv_features(qkv: torch.Tensor, which: str, num_prefix_tokens: int) -> torch.Tensor:
    """The patch tokens' ``keys``, ``values`` or ``queries`` (heads concatenated), (B, P, D),
    of a last block's query-key-value projection ``qkv`` (B, T, 3 D)."""
    if which not in FEATURES:
        raise ValueError(f"LOST features must be one of {FEATURES}, got {which!r}")
    index = {"queries": 0, "keys": 1, "values": 2}[which]
    return qkv.chunk(3, dim=-1)[index].float()[:, num_prefix_tokens:]


def _features(backbone: nn.Module, images: torch.Tensor, which: str) -> torch.Tensor:
    return qkv_features(observe(backbone, images).qkv, which, backbone.num_prefix_tokens)


@torch.no_grad()
def last_block_features(
    backbone: nn.Module, images: Images, which: str = "keys", batch_size: int = 32
) -> torch.Tensor:
    """Patch tokens' ``keys``, ``values`` or ``queries`` in the last block, heads concatenated:
    (N, P, D)."""
    device = device_of(backbone)
    return torch.cat(
        [_features(backbone, b, which).cpu() for b in batches(images, batch_size, device)]
    )


def pad_to_patches(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``image`` (C, H, W) with zeros added at the bottom and right up to a multiple of
    ``patch_size`` (zeros of the normalized image, as the reference pads)."""
    h, w = image.shape[-2:]
    return F.pad(image, (0, -w % patch_size, 0, -h % patch_size))


def _padded_batches(
    images: Iterable[torch.Tensor], patch_size: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """Consecutive images of one padded shape, at most ``batch_size`` together, with their
    sizes before padding."""
    batch: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for image in images:
        padded = pad_to_patches(image, patch_size)
        if batch and (padded.shape != batch[0].shape or len(batch) == batch_size):
            yield torch.stack(batch), sizes
            batch, sizes = [], []
        batch.append(padded)
        sizes.append(tuple(image.shape[-2:]))
    if batch:
        yield torch.stack(batch), sizes


def connected_component(mask: torch.Tensor, seed: tuple[int, int]) -> torch.Tensor:
    """The 4-connected component of ``mask`` (h, w) holding ``seed``."""
    h, w = mask.shape
    component = torch.zeros_like(mask)
    stack = [seed]
    while stack:
        r, c = stack.pop()
        if 0 <= r < h and 0 <= c < w and mask[r, c] and not component[r, c]:
            component[r, c] = True
            stack += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
    return component


def default_k(patches: int) -> int:
    """LOST's 100 seed-expansion candidates of a ~700-patch VOC image, in proportion for
    smaller grids."""
    return min(100, math.ceil(patches / 7))


def degree_order(gram: torch.Tensor, ties: str = "stable") -> torch.Tensor:
    """Patch indices by increasing degree: the number of other patches with a positive entry
    in ``gram``; equal degrees ordered by ``ties`` (``stable`` or ``reference``)."""
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    positive = gram > 0
    positive.fill_diagonal_(False)
    degree = positive.sum(dim=-1)
    if ties == "stable":
        return torch.argsort(degree, stable=True)
    return torch.argsort(-degree.float(), descending=True)  # the reference's call, unstable


def lost_box(
    features: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    k: int | None = None,
    gram_bias: float = 0.0,
    ties: str = "stable",
    image_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, int]:
    """LOST's box (x0, y0, x1, y1) in pixels for one image's patch ``features`` (P, D), and the
    seed patch. ``k`` seed-expansion candidates (default ``default_k``); ``gram_bias`` is added
    to the Gram matrix (the registers paper's variant); ``ties`` orders equal degrees (see
    ``degree_order``); the box is clipped to ``image_size`` (height, width) of a padded image."""
    gram = features @ features.T + gram_bias
    order = degree_order(gram, ties)
    seed = int(order[0])
    candidates = order[: k or default_k(len(order))]
    similar = candidates[gram[seed, candidates] > 0]
    mask = (gram[similar].sum(dim=0) > 0).reshape(grid).cpu()
    component = connected_component(mask, (seed // grid[1], seed % grid[1]))
    if not component.any():  # the reference raises too; only a zero feature vector does this
        raise ValueError(f"LOST's seed patch {seed} is outside its own object mask")
    rows = component.any(dim=1).nonzero().flatten()
    cols = component.any(dim=0).nonzero().flatten()
    box = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float() * patch_size
    if image_size is not None:
        box[2] = box[2].clamp_max(image_size[1])
        box[3] = box[3].clamp_max(image_size[0])
    return box, seed


def box_iou(box: torch.Tensor, boxes: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """IoU of ``box`` (4,) with each of ``boxes`` (K, 4), all (x0, y0, x1, y1), in float64.
    ``eps`` is added as the reference adds it (to each box's height and to the union), so an
    IoU of exactly 0.5 there falls just below."""
    box, boxes = box.double(), boxes.double()
    low = torch.maximum(box[:2], boxes[:, :2])
    high = torch.minimum(box[2:], boxes[:, 2:])
    inter = (high - low).clamp_min(0).prod(dim=-1)
    w1, h1 = (box[2:] - box[:2]).clamp_min(0)
    w2, h2 = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0).unbind(dim=-1)
    union = w1 * (h1 + eps) + w2 * (h2 + eps) - inter + eps
    return inter / union.clamp_min(1e-12)


def corloc(
    predicted: torch.Tensor,
    truth: list[torch.Tensor],
    level: float = 0.5,
    over: str = "boxed",
    eps: float = 0.0,
) -> float | None:
    """Share of the images whose box overlaps one of theirs with IoU at least ``level``, over
    the images with ground truth (``boxed``) or over ``all``, where an image without ground
    truth is a miss; None when there is no image to count."""
    if over not in CORLOC_OVER:
        raise ValueError(f"corloc_over must be one of {CORLOC_OVER}, got {over!r}")
    pairs = zip(predicted, truth, strict=True)
    hits = [
        bool(len(t)) and bool((box_iou(p, t, eps) >= level).any())
        for p, t in pairs
        if len(t) or over == "all"
    ]
    return sum(hits) / len(hits) if hits else None


def centred_boxes(truth: list[torch.Tensor], sizes: list[tuple[int, int]]) -> torch.Tensor:
    """The baseline without a model: in every image of ``sizes`` (height, width) a centred box
    whose width and height, as shares of its image's, are the mean shares of the ground-truth
    boxes (largest box of each image)."""
    frame = torch.tensor(sizes, dtype=torch.float32).flip(-1)  # (N, 2): width, height
    shares = [
        (t[:, 2:] - t[:, :2])[(t[:, 2:] - t[:, :2]).prod(-1).argmax()] / frame[i]
        for i, t in enumerate(truth)
        if len(t)
    ]
    if not shares:
        return torch.zeros(len(truth), 4)
    size = torch.stack(shares).mean(0) * frame
    return torch.cat([(frame - size) / 2, (frame + size) / 2], dim=-1)


def lost_boxes(
    features: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    sizes: list[tuple[int, int]],
    k: int | None = None,
    gram_bias: float = 0.0,
    ties: str = "stable",
) -> list[tuple[torch.Tensor, int]]:
    """``lost_box`` of each image of a batch: ``features`` (B, P, D) on the ``grid``, each
    image's box clipped to its size in ``sizes`` (height, width before padding)."""
    return [
        lost_box(image_features, grid, patch_size, k, gram_bias, ties, size)
        for image_features, size in zip(features, sizes, strict=True)
    ]


def lost_result(
    found: list[tuple[torch.Tensor, int]],
    sizes: list[tuple[int, int]],
    truth: list[torch.Tensor],
    corloc_over: str = "boxed",
    iou_eps: float = 0.0,
) -> dict:
    """What ``lost`` returns, from the box and seed ``found`` in each image of ``sizes``."""
    predicted = torch.stack([box for box, _ in found])
    rule = dict(over=corloc_over, eps=iou_eps)
    return {
        "boxes": predicted,
        "seeds": torch.tensor([seed for _, seed in found]),
        "sizes": sizes,
        "corloc": corloc(predicted, truth, **rule),
        "corloc_centred": corloc(centred_boxes(truth, sizes), truth, **rule),
        "evaluated": len(truth) if corloc_over == "all" else sum(1 for b in truth if len(b)),
    }


@torch.no_grad()
def lost(
    backbone: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    boxes: list[torch.Tensor],
    which: str = "keys",
    k: int | None = None,
    gram_bias: float = 0.0,
    batch_size: int = 32,
    ties: str = "stable",
    corloc_over: str = "boxed",
    iou_eps: float = 0.0,
) -> dict:
    """LOST on every image of ``images`` ((N, C, H, W), or (C, H, W) images of any sizes, each
    zero-padded to a patch multiple and run at that size): ``boxes`` (N, 4) in pixels of each
    image, ``seeds`` (N,), ``sizes`` (height, width of each image), ``corloc`` against the
    ground truth and ``corloc_centred`` of the centred-box baseline (None with no image to
    count), and ``evaluated``: the images counted."""
    found, sizes = [], []
    device = device_of(backbone)
    patch = backbone.patch_size
    for batch, batch_sizes in _padded_batches(images, patch, batch_size):
        grid = (batch.shape[-2] // patch, batch.shape[-1] // patch)
        features = _features(backbone, batch.to(device), which)
        found += lost_boxes(features, grid, patch, batch_sizes, k, gram_bias, ties)
        sizes += batch_sizes
    return lost_result(found, sizes, boxes, corloc_over, iou_eps)


def _draw_box(ax, box: torch.Tensor, scale: float, side: tuple[int, int], **style) -> None:
    """``box`` (pixels of the analysed image) on an ``imshow`` of ``side`` (height, width)
    display pixels: pixel edges sit half a pixel before the centres ``imshow`` puts at whole
    numbers, and a box on the image's edge is pulled in by its line width so it is drawn inside
    the frame rather than under it."""
    inset = 0.015 * max(side)
    x0, y0, x1, y1 = (box * scale).tolist()
    x0, y0 = max(x0, inset) - 0.5, max(y0, inset) - 0.5
    x1, y1 = min(x1, side[1] - inset) - 0.5, min(y1, side[0] - inset) - 0.5
    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, zorder=3, **style))


TRUTH_STYLE = {"edgecolor": "lime", "linewidth": 1.2}
LOST_STYLE = {"edgecolor": "red", "linewidth": 1.5, "linestyle": "--"}


def draw_lost(rows: dict[str, tuple], n: int = 8):
    """A row per model of ``(images, truth, boxes)``: the first ``n`` images with LOST's box
    (red, dashed) over the ground truth (green), boxes in pixels of the drawn images, each
    image titled with its best IoU. Returns the figure."""
    n = min(n, min(len(images) for images, _, _ in rows.values()))
    fig, axes = plt.subplots(
        len(rows), n, figsize=(1.6 * n, 1.8 * len(rows)), squeeze=False, layout="constrained"
    )
    for row, (name, (images, truth, boxes)) in enumerate(rows.items()):
        shown = display_images(images[:n])
        scale = shown.shape[-1] / images.shape[-1]
        for col, image in enumerate(shown):
            ax = axes[row, col]
            ax.imshow(image.permute(1, 2, 0).numpy())
            for box in truth[col]:
                _draw_box(ax, box, scale, image.shape[-2:], **TRUTH_STYLE)
            _draw_box(ax, boxes[col], scale, image.shape[-2:], **LOST_STYLE)
            iou = box_iou(boxes[col], truth[col]).max().item() if len(truth[col]) else None
            ax.set_title("no box" if iou is None else f"IoU {iou:.2f}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(
            textwrap.fill(name, 16), fontsize=7, rotation=0, ha="right", va="center"
        )
    fig.legend(
        handles=[
            Patch(fill=False, label="LOST box", **LOST_STYLE),
            Patch(fill=False, label="ground truth", **TRUTH_STYLE),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize=8,
        frameon=False,
    )
    fig.suptitle("LOST object discovery (IoU: best overlap with a ground-truth box)", fontsize=10)
    return fig


def plot_lost(rows: dict[str, tuple], path: Path, n: int = 8) -> Path:
    """``draw_lost`` written to ``path``."""
    return save(draw_lost(rows, n), path)

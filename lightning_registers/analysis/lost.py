"""Object discovery with LOST (Siméoni et al., 2021) and its CorLoc against ground-truth boxes.

LOST on one image: the patches' last-block keys (or values/queries, heads concatenated) form a
Gram matrix; the seed is the patch positively correlated with the fewest others; the seed is
expanded to those of the ``k`` lowest-degree patches positively correlated with it; a patch
belongs to the object when its summed correlation to that set is positive, and the box is the
bounding box of the 4-connected component holding the seed. Written out here because LOST is
not a package; the steps follow the authors' code."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from ..measures.figures import display_images, plt, save_figure
from .tokens import batches, device_of

FEATURES = ("keys", "values", "queries")


@torch.no_grad()
def last_block_features(
    backbone: nn.Module, images: torch.Tensor, which: str = "keys", batch_size: int = 32
) -> torch.Tensor:
    """Patch tokens' ``keys``, ``values`` or ``queries`` in the last block, heads concatenated:
    (N, P, D)."""
    if which not in FEATURES:
        raise ValueError(f"LOST features must be one of {FEATURES}, got {which!r}")
    index = {"queries": 0, "keys": 1, "values": 2}[which]
    captured = []
    handle = backbone.blocks[-1].attn.qkv.register_forward_hook(
        lambda module, args, output: captured.append(output.chunk(3, dim=-1)[index].float().cpu())
    )
    try:
        for batch in batches(images, batch_size, device_of(backbone)):
            backbone(batch)
    finally:
        handle.remove()
    return torch.cat(captured)[:, backbone.num_prefix_tokens :]


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


def lost_box(
    features: torch.Tensor,
    grid: tuple[int, int],
    patch_size: int,
    k: int | None = None,
    gram_bias: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """LOST's box (x0, y0, x1, y1) in pixels for one image's patch ``features`` (P, D), and the
    seed patch. ``k`` seed-expansion candidates (default ``default_k``); ``gram_bias`` is added
    to the Gram matrix (the registers paper's variant)."""
    gram = features @ features.T + gram_bias
    degree = (gram > 0).sum(dim=-1)
    order = torch.argsort(degree, stable=True)
    seed = int(order[0])
    candidates = order[: k or default_k(len(order))]
    similar = candidates[gram[seed, candidates] > 0]
    mask = (gram[similar].sum(dim=0) > 0).reshape(grid)
    component = connected_component(mask, (seed // grid[1], seed % grid[1]))
    rows = component.any(dim=1).nonzero().flatten()
    cols = component.any(dim=0).nonzero().flatten()
    box = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float() * patch_size
    return box, seed


def box_iou(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of ``box`` (4,) with each of ``boxes`` (K, 4), all (x0, y0, x1, y1)."""
    low = torch.maximum(box[:2], boxes[:, :2])
    high = torch.minimum(box[2:], boxes[:, 2:])
    inter = (high - low).clamp_min(0).prod(dim=-1)
    area = lambda b: (b[..., 2:] - b[..., :2]).clamp_min(0).prod(dim=-1)  # noqa: E731
    return inter / (area(box) + area(boxes) - inter).clamp_min(1e-9)


def corloc(predicted: torch.Tensor, truth: list[torch.Tensor], level: float = 0.5) -> float | None:
    """Share of the images with ground truth where the box overlaps one of theirs with IoU at
    least ``level``; None when no image has ground truth."""
    pairs = zip(predicted, truth, strict=True)
    hits = [bool((box_iou(p, t) >= level).any()) for p, t in pairs if len(t)]
    return sum(hits) / len(hits) if hits else None


def centred_boxes(truth: list[torch.Tensor], image_size: int) -> torch.Tensor:
    """The baseline without a model: for every image the same centred box, as wide and high as
    the ground-truth boxes on average (largest box of each image)."""
    largest = [t[(t[:, 2:] - t[:, :2]).prod(-1).argmax()] for t in truth if len(t)]
    if not largest:
        return torch.zeros(len(truth), 4)
    size = torch.stack([b[2:] - b[:2] for b in largest]).mean(0)
    centre = torch.full((2,), image_size / 2)
    return torch.cat([centre - size / 2, centre + size / 2]).expand(len(truth), 4)


def lost(
    backbone: nn.Module,
    images: torch.Tensor,
    boxes: list[torch.Tensor],
    which: str = "keys",
    k: int | None = None,
    gram_bias: float = 0.0,
    batch_size: int = 32,
) -> dict:
    """LOST on every image: ``boxes`` (N, 4), ``seeds`` (N,), ``corloc`` against the
    ground truth and ``corloc_centred`` of the centred-box baseline (None without ground
    truth), and ``evaluated``: images with ground truth."""
    features = last_block_features(backbone, images, which, batch_size)
    grid = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
    found = [lost_box(f, grid, backbone.patch_size, k, gram_bias) for f in features]
    predicted = torch.stack([box for box, _ in found])
    return {
        "boxes": predicted,
        "seeds": torch.tensor([seed for _, seed in found]),
        "corloc": corloc(predicted, boxes),
        "corloc_centred": corloc(centred_boxes(boxes, images.shape[-1]), boxes),
        "evaluated": sum(1 for b in boxes if len(b)),
    }


def plot_lost(rows: dict[str, tuple], path: Path, n: int = 8) -> Path:
    """A row per model of ``(images, truth, boxes)``: the first ``n`` images with LOST's box
    (red) over the ground truth (green)."""
    n = min(n, min(len(images) for images, _, _ in rows.values()))
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.8 * len(rows)), squeeze=False)
    for row, (name, (images, truth, boxes)) in enumerate(rows.items()):
        shown = display_images(images[:n])
        scale = shown.shape[-1] / images.shape[-1]
        for col, image in enumerate(shown):
            ax = axes[row, col]
            ax.imshow(image.permute(1, 2, 0).numpy())
            for box, colour in [(b, "lime") for b in truth[col]] + [(boxes[col], "red")]:
                x0, y0, x1, y1 = (box * scale).tolist()
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colour))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("LOST boxes (red) and ground truth (green)", fontsize=10)
    return save_figure(fig, path)

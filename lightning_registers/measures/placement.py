"""Where patches sit in the image: how redundant each patch is with its neighbours (paper Fig. 6:
artifacts sit on patches nearly identical to their 4 neighbours right after patch embedding)
and whether it lies on an object or on the background, where object boxes are known."""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNKNOWN = -1.0
"""The value of an object mask where an image's objects are not known."""


def neighbour_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each position of ``embeddings`` (N, h, w, D) to its up, down,
    left and right neighbours that exist: (N, h, w)."""
    x = F.normalize(embeddings.float(), dim=-1)
    total = torch.zeros(x.shape[:3], device=x.device)
    count = torch.zeros(x.shape[1:3], device=x.device)
    for dim in (1, 2):
        cos = (x.narrow(dim, 0, x.shape[dim] - 1) * x.narrow(dim, 1, x.shape[dim] - 1)).sum(-1)
        n = x.shape[dim] - 1
        total.narrow(dim, 0, n).add_(cos)
        total.narrow(dim, 1, n).add_(cos)
        count.narrow(dim - 1, 0, n).add_(1)
        count.narrow(dim - 1, 1, n).add_(1)
    return total / count


def object_share(objects: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Share of each patch's pixels that lie on an object, (N, P), from pixel masks ``objects``
    (N, H, W): 1 on an object, 0 on the background, ``UNKNOWN`` (any negative value) in images
    whose objects are not known; NaN for every patch of such an image."""
    known = (objects >= 0).flatten(1).all(dim=1)
    share = F.avg_pool2d(objects.float().clamp_min(0)[:, None], patch_size).flatten(1)
    share[~known] = float("nan")
    return share

"""Resampling of patch position embeddings to another grid (bicubic), for the backbone at
other image sizes and for checkpoints of another size."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resample_patch_pos_embed(
    patch_pos: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    antialias: bool = True,
    offset: float = 0.0,
) -> torch.Tensor:
    """A patch position embedding ``(1, h0 * w0, D)`` on ``old_grid`` resampled to
    ``new_grid``, ``(1, h * w, D)``. ``offset`` > 0 resizes by the scale factor
    ``(new + offset) / old`` as released DINOv2 does, instead of to the exact size."""
    (h0, w0), dim = old_grid, patch_pos.shape[-1]
    grid = patch_pos.float().reshape(1, h0, w0, dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((new_grid[0] + offset) / h0, (new_grid[1] + offset) / w0)
        resize = dict(scale_factor=scale)
    else:
        resize = dict(size=tuple(new_grid))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **resize)
    if tuple(grid.shape[-2:]) != tuple(new_grid):
        raise RuntimeError(f"interpolated grid {tuple(grid.shape[-2:])} is not {new_grid}")
    return grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(patch_pos.dtype)

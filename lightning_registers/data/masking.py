"""iBOT block masks over the patch grid (BEiT's generator, as DINOv2 uses it), per crop or
stratified over a batch as DINOv2's collate draws them.

Our own because neither timm nor torchvision ships it; random numbers come from torch's global
generator, which DataLoader workers seed per worker.
"""

from __future__ import annotations

import math

import torch


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


class BlockMaskGenerator:
    """Boolean masks of ``num_masked`` patches made of rectangular blocks.

    Args:
        grid: (height, width) of the patch grid.
        min_block_patches: smallest block.
        max_block_fraction: largest block as a fraction of the grid (DINOv2: 0.5).
        min_aspect: smallest block aspect ratio (the largest is its inverse).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_block_patches: int = 4,
        max_block_fraction: float = 0.5,
        min_aspect: float = 0.3,
    ) -> None:
        self.height, self.width = grid
        self.num_patches = self.height * self.width
        self.min_block_patches = min_block_patches
        self.max_block_patches = max(int(max_block_fraction * self.num_patches), 1)
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: torch.Tensor, budget: int) -> int:
        for _ in range(10):
            area = _uniform(min(self.min_block_patches, budget), budget)
            aspect = math.exp(_uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:
                top = int(torch.randint(0, self.height - h + 1, ()))
                left = int(torch.randint(0, self.width - w + 1, ()))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block.fill_(True)
                    return new
        return 0

    def __call__(self, num_masked: int) -> torch.Tensor:
        """A flat (height * width,) mask with at most ``num_masked`` patches set."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masked:
            added = self._add_block(mask, min(num_masked - count, self.max_block_patches))
            if added == 0:
                break
            count += added
        return mask.flatten()


def stratified_masks(
    generator: BlockMaskGenerator,
    count: int,
    probability: float,
    ratio: tuple[float, float],
) -> torch.Tensor:
    """``count`` masks (count, patches) for a batch as DINOv2's collate draws them: exactly
    ``int(count x probability)`` are masked, the i-th of those with a share of patches drawn
    uniformly from the i-th of as many equal slices of ``ratio``, the rest empty, in random
    order."""
    n_masked = int(count * probability)
    bounds = torch.linspace(ratio[0], ratio[1], n_masked + 1).tolist()
    masks = [
        generator(int(generator.num_patches * _uniform(low, high)))
        for low, high in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    masks += [generator(0)] * (count - n_masked)
    order = torch.randperm(count).tolist()
    return torch.stack([masks[i] for i in order])

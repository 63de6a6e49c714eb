"""A RegisterViT edited to produce high-norm tokens at known places, and images to show it.

Patch positions ``PLANTED`` carry a marker direction in their position embedding; one MLP
neuron of block ``PLANTED_BLOCK`` fires only on that marker and writes a large vector into two
channels of the residual stream, which the final LayerNorm weights up: from that block on, the
tokens at those positions have norms far above the others, as artifact tokens do."""

import torch

from lightning_registers.models import RegisterViT

PLANTED = (9, 14, 49)
PLANTED_BLOCK = 1
PLANTED_NEURON = 5
GRID = 8
PATCH = 8
SIDE = GRID * PATCH


def planted_backbone(
    plant: bool = True, seed: int = 0, positions=PLANTED, block_index: int = PLANTED_BLOCK
) -> RegisterViT:
    """A 4-block ViT (width 64, 8x8 patches of 8 pixels, no registers); ``plant=False`` gives
    the same weights without the edit; ``positions`` and ``block_index`` move the planted tokens."""
    torch.manual_seed(seed)
    model = RegisterViT(
        "vit_tiny",
        img_size=SIDE,
        patch_size=PATCH,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_registers=0,
    ).eval()
    if not plant:
        return model
    # Channels 0-1 carry the artifact, channel 2 the marker; nothing else writes to them.
    mlp = model.blocks[block_index].mlp
    with torch.no_grad():
        model.pos_embed.mul_(25)  # positions readable from normal tokens
        model.pos_embed[..., :3] = 0
        model.pos_embed[0, 1 + torch.tensor(positions), 2] = 6.0
        model.patch_embed.proj.weight[:3] = 0
        model.patch_embed.proj.bias[:3] = 0
        for block in model.blocks:
            block.attn.proj.weight[:3] = 0
            block.mlp.fc2.weight[:3] = 0
        mlp.fc1.weight[PLANTED_NEURON] = 0
        mlp.fc1.weight[PLANTED_NEURON, 2] = 4.0
        mlp.fc1.bias[PLANTED_NEURON] = -8.0
        mlp.fc2.weight[:2, PLANTED_NEURON] = torch.tensor([100.0, -100.0])
        model.norm.weight[:2] = 30
    return model


def redundant_images(n: int = 64, seed: int = 0, uniform_at_planted: bool = True) -> torch.Tensor:
    """Noise images, normalized-scale, whose 3x3 patch neighbourhoods around the planted
    positions are one uniform colour (or, with ``uniform_at_planted=False``, noise images with
    a uniform background and noise only around the planted positions)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, SIDE, SIDE, generator=gen)
    colour = torch.randn(n, 3, 1, 1, generator=gen).expand(n, 3, SIDE, SIDE)
    around = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    for p in PLANTED:
        r, c = divmod(p, GRID)
        around[max(r - 1, 0) * PATCH : (r + 2) * PATCH, max(c - 1, 0) * PATCH : (c + 2) * PATCH] = (
            True
        )
    if not uniform_at_planted:
        around = ~around
    return torch.where(around, colour, noise)

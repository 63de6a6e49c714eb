"""The signature of artifact tokens and the rule that tells them from look-alikes.

The paper's artifacts are few high-norm patch tokens (about 2 % of the patches) that appear
from the middle of the network on and stay to the output, sit on redundant background patches
(nearly identical to their neighbours), and draw the [CLS] attention. Early in training a small
model shows look-alikes that share only the norm: a large share of tokens, high from the first
block on, on the coloured objects, where the patch embedding meets contrasting content. The
signature of the high-norm tokens of each layer measures each of these traits; the rule
(``ArtifactSignature``) says which layers show all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention import attention_on_high_norm, with_prefix_attention
from .norms import OUTPUT, OutlierRule, token_norms
from .placement import neighbour_cosine

SIGNATURE_KEYS = (
    "image_share_max",
    "background_share",
    "neighbour_cosine_high_norm",
    "neighbour_cosine_normal",
    "cls_attention_on_high_norm",
    "onset_block",
)
"""The signature's scalars besides the share (None where there is nothing to measure)."""


def layer_block(layer: str, depth: int) -> int:
    """A layer's place in the network: NN for ``blockNN``, ``depth`` for the output."""
    return depth if layer == OUTPUT else int(layer.removeprefix("block"))


def probe_forward(backbone: nn.Module, images: torch.Tensor, blocks: Sequence[int]) -> dict:
    """One forward of ``backbone`` on ``images`` that measures what the signature needs:
    ``norms`` (``token_norms`` after ``blocks`` and at the output), ``redundancy`` (B, P): each
    patch embedding's cosine similarity to its 4 neighbours, before position embeddings, and
    ``attention``: the ``prefix_attention`` of the last block."""
    embedded: list[torch.Tensor] = []
    hook = backbone.patch_embed.register_forward_hook(
        lambda module, args, output: embedded.append(output.detach())
    )
    try:
        norms, attention = with_prefix_attention(
            backbone, images, lambda: token_norms(backbone, images, blocks)
        )
    finally:
        hook.remove()
    grid = attention.shape[-2:]
    redundancy = neighbour_cosine(embedded[0].reshape(len(images), *grid, -1)).flatten(1)
    return {"norms": norms, "redundancy": redundancy.cpu(), "attention": attention.cpu()}


def onset(masks: dict[str, torch.Tensor], layer: str, overlap: float = 0.5) -> str | None:
    """Where the high-norm tokens of ``layer`` appear: going back from ``layer`` through the
    layers of ``masks`` (high-norm flags (B, P) per layer, in network order), the earliest layer
    from which on at least ``overlap`` of them are high-norm at every layer; None when ``layer``
    has no high-norm token."""
    names = list(masks)
    high = masks[layer]
    count = high.sum()
    if count == 0:
        return None
    i = names.index(layer)
    while i > 0 and (masks[names[i - 1]] & high).sum() >= overlap * count:
        i -= 1
    return names[i]


def _mean(values: torch.Tensor) -> float | None:
    return values.float().mean().item() if values.numel() else None


def high_norm_signature(
    patch_norms: dict[str, torch.Tensor],
    depth: int,
    rule: OutlierRule,
    redundancy: torch.Tensor,
    attention: torch.Tensor,
    objects: torch.Tensor | None = None,
    object_cut: float = 0.5,
) -> dict[str, dict]:
    """Per layer, the signature of its high-norm patch tokens by ``rule``: ``share`` of the
    patches; ``image_share_max``, their largest share of one image's patches (a whole background
    lifted by its colour is many in one image, artifacts are a few in each); ``onset_layer``
    and ``onset_block`` (``onset``, as a ``layer_block``); mean neighbour cosine
    (``redundancy``, (B, P)) of the high-norm and of the normal tokens;
    ``cls_attention_on_high_norm``: the share of the last-block [CLS] attention over the
    patches (``attention``, a ``prefix_attention``) that lands on them; ``background_share``:
    the share of them on background patches (less than ``object_cut`` of the patch on an
    object) among images whose ``objects`` (an ``object_share`` (B, P)) are known, else None.

    Args:
        patch_norms: patch-token norms (B, P) per layer, in network order (``blockNN``, then
            ``output``).
        depth: the backbone's number of blocks.
    """
    masks = {layer: rule.mask(norms) for layer, norms in patch_norms.items()}
    known = None if objects is None else ~objects.isnan()
    result = {}
    for layer, high in masks.items():
        first = onset(masks, layer)
        background = None
        if known is not None and (high & known).any():
            background = (objects[high & known] < object_cut).float().mean().item()
        result[layer] = {
            "share": high.float().mean().item(),
            "image_share_max": high.float().mean(dim=1).max().item(),
            "onset_layer": first,
            "onset_block": None if first is None else layer_block(first, depth),
            "neighbour_cosine_high_norm": _mean(redundancy[high]),
            "neighbour_cosine_normal": _mean(redundancy[~high]),
            "cls_attention_on_high_norm": (
                attention_on_high_norm(attention, high)["cls"] if high.any() else None
            ),
            "background_share": background,
        }
    return result


@dataclass(frozen=True)
class ArtifactSignature:
    """When the high-norm tokens of a layer look like the paper's artifacts rather than
    look-alikes: all of these hold (persistence over checks is the caller's to judge).

    Args:
        min_share: few but there: more than this share of the patches is high-norm.
        max_share: few: at most this share, over the probe images and in any one of them (the
            paper's artifacts are about 2 % of the patches).
        min_onset: beyond the first blocks: the tokens appear (``onset``) at a block index
            of at least this fraction of the depth (0.25: not in the first quarter, block 3 or
            later of 12, block 1 or later of 4; 0 turns the condition off).
        min_background: on redundant patches, where the objects are known: at least this share
            of the tokens on background patches.
        min_redundancy_gap: on redundant patches, where no object is known: the tokens' mean
            neighbour cosine exceeds that of the normal tokens by more than this.
    """

    min_share: float = 0.01
    max_share: float = 0.10
    min_onset: float = 0.25
    min_background: float = 0.5
    min_redundancy_gap: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_share < self.max_share <= 1:
            raise ValueError(
                f"need 0 <= min_share < max_share <= 1, got {self.min_share}, {self.max_share}"
            )
        if not 0 <= self.min_onset <= 1:
            raise ValueError(f"min_onset must lie in [0, 1], got {self.min_onset}")

    def failures(self, stats: dict, depth: int) -> list[str]:
        """The conditions that one layer's ``high_norm_signature`` fails: ``few``, ``late``,
        ``background`` or ``redundant``; empty when it looks like artifacts."""
        failed = []
        few = self.min_share < stats["share"] <= self.max_share
        if not few or stats["image_share_max"] > self.max_share:
            failed.append("few")
        if stats["onset_block"] is None or stats["onset_block"] < self.min_onset * depth:
            failed.append("late")
        if stats["background_share"] is not None:
            if stats["background_share"] < self.min_background:
                failed.append("background")
        else:
            high, normal = stats["neighbour_cosine_high_norm"], stats["neighbour_cosine_normal"]
            if high is None or normal is None or high - normal <= self.min_redundancy_gap:
                failed.append("redundant")
        return failed

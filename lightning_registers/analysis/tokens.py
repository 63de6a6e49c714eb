"""Token features of a backbone over many images, batch by batch: what one forward shows
(``observe``), and the per-layer norms and output tokens of a set of images."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..measures.norms import token_norms
from .images import ImageSet

Images = torch.Tensor | ImageSet
"""Images to measure: a tensor (N, 3, H, W), or an ``ImageSet`` read batch by batch."""


def batches(images: Images, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``images`` ``batch_size`` at a time, on ``device``."""
    if isinstance(images, ImageSet):
        chunks = images.batches(batch_size)
    else:
        chunks = (images[start : start + batch_size] for start in range(0, len(images), batch_size))
    for chunk in chunks:
        yield chunk.to(device)


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the heap memory that freed tensors leave back to the system (glibc). A batch's
    transient tensors are freed into glibc's heap, where the few tensors kept from each batch
    fragment it, so that without this a long pass would grow by part of a batch at every
    batch; called between batches, it keeps memory at what is live."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@dataclass
class Observation:
    """What one forward of a batch shows.

    Attributes:
        norms: ``token_norms`` of every block and of the output.
        cls: the normalized output [CLS], (B, D).
        patches: the normalized output patch tokens, (B, P, D).
        qkv: the last block's query-key-value projection, (B, T, 3 D).
        grid: the patch grid (h, w).
    """

    norms: dict[str, dict[str, torch.Tensor]]
    cls: torch.Tensor
    patches: torch.Tensor
    qkv: torch.Tensor
    grid: tuple[int, int]


@torch.no_grad()
def observe(backbone: nn.Module, images: torch.Tensor) -> Observation:
    """One forward of ``backbone`` on ``images``, read by hooks (it computes nothing else)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda module, args, output: captured.__setitem__(name, output.float())

    handles = [
        backbone.blocks[-1].attn.qkv.register_forward_hook(keep("qkv")),
        backbone.norm.register_forward_hook(keep("output")),
    ]
    try:
        norms = token_norms(backbone, images, range(backbone.depth))
    finally:
        for handle in handles:
            handle.remove()
    output = captured["output"]
    r = backbone.num_prefix_tokens
    grid = backbone.patch_grid(images)
    return Observation(norms, output[:, 0], output[:, r:], captured["qkv"], grid)


@torch.no_grad()
def patch_norms_by_layer(
    backbone: nn.Module, images: Images, batch_size: int = 32
) -> dict[str, torch.Tensor]:
    """Patch-token norms (N, P) after every block (``blockNN``, the residual stream) and of the
    normalized output (``output``)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in batches(images, batch_size, device_of(backbone)):
        for layer, kinds in token_norms(backbone, batch, range(backbone.depth)).items():
            parts.setdefault(layer, []).append(kinds["patches"].cpu())
    return {layer: torch.cat(chunks) for layer, chunks in parts.items()}


@torch.no_grad()
def output_tokens(
    backbone: nn.Module, images: Images, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized output [CLS] (N, D) and patch tokens (N, P, D) (every token of every
    image: for a few images; the analysis keeps a selection, batch by batch)."""
    cls, patches = [], []
    for batch in batches(images, batch_size, device_of(backbone)):
        features = backbone(batch, return_features=True)
        cls.append(features["x_norm_clstoken"].float().cpu())
        patches.append(features["x_norm_patchtokens"].float().cpu())
    return torch.cat(cls), torch.cat(patches)

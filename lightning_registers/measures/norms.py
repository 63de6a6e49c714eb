"""Token norms and the outlier rule: which tokens are high-norm (paper Fig. 3, 4, 5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

TOKEN_KINDS = ("cls", "registers", "patches")
OUTPUT = "output"
RULES = ("relative", "absolute")


@dataclass(frozen=True)
class OutlierRule:
    """Which patch tokens are high-norm: norm above ``threshold`` (``absolute``, the paper's
    150) or above ``factor`` times the median of the norms judged together (``relative``, the
    scale-free rule: 3 x a typical norm of 50 is 150)."""

    kind: str = "relative"
    threshold: float = 150.0
    factor: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise ValueError(f"outlier rule must be one of {RULES}, got {self.kind!r}")

    @property
    def share_key(self) -> str:
        """The name of this rule's high-norm share in statistics, tags and summaries."""
        return f"high_norm_share_{self.kind}"

    def cut(self, norms: torch.Tensor) -> float:
        """The norm above which a token of ``norms`` is high-norm."""
        if self.kind == "absolute":
            return self.threshold
        return self.factor * norms.float().median().item()

    def mask(self, norms: torch.Tensor) -> torch.Tensor:
        """High-norm flags, the shape of ``norms``."""
        return norms > self.cut(norms)

    def share(self, norms: torch.Tensor) -> float:
        """The share (0..1) of ``norms`` that is high-norm."""
        return self.mask(norms).float().mean().item()


def layer_name(index: int) -> str:
    """The name of the residual stream after block ``index``."""
    return f"block{index:02d}"


def token_norms(
    backbone: nn.Module, images: torch.Tensor, blocks: Sequence[int]
) -> dict[str, dict[str, torch.Tensor]]:
    """L2 norms of the tokens after each listed block (the residual stream) and of the final
    normalized output, split by kind: ``{layer: {"cls": (B,), "registers": (B, R),
    "patches": (B, N)}}`` with layers named ``blockNN`` and ``output``. Runs the backbone's own
    forward (hooks read the blocks), so FSDP2 gathers and frees parameters as in training."""
    depth = backbone.depth
    wanted = sorted({i % depth for i in blocks})
    captured: dict[int, torch.Tensor] = {}

    def keep(index: int):
        def hook(module, args, output):
            captured[index] = output.detach().float().norm(dim=-1)  # not the whole stream

        return hook

    handles = [backbone.blocks[i].register_forward_hook(keep(i)) for i in wanted]
    try:
        features = backbone(images, return_features=True)
    finally:
        for handle in handles:
            handle.remove()
    r = backbone.num_prefix_tokens
    result = {}
    for i in wanted:
        norms = captured[i]
        result[layer_name(i)] = {
            "cls": norms[:, 0],
            "registers": norms[:, 1:r],
            "patches": norms[:, r:],
        }
    result[OUTPUT] = {
        "cls": features["x_norm_clstoken"].float().norm(dim=-1),
        "registers": features["x_norm_regtokens"].float().norm(dim=-1),
        "patches": features["x_norm_patchtokens"].float().norm(dim=-1),
    }
    return result


def high_norm_stats(
    patch_norms: torch.Tensor, threshold: float = 150.0, factor: float = 3.0
) -> dict[str, float]:
    """Scalars of one layer's patch-token norms: the high-norm share by each rule
    (``high_norm_share_absolute``: above ``threshold``; ``high_norm_share_relative``: above
    ``factor`` times the median norm), ``max_over_median``, ``median`` and ``max``."""
    flat = patch_norms.flatten().float()
    median = flat.median()
    stats = {
        rule.share_key: rule.share(flat)
        for rule in (OutlierRule(kind, threshold, factor) for kind in RULES)
    }
    stats.update(
        max_over_median=(flat.max() / median.clamp_min(1e-12)).item(),
        median=median.item(),
        max=flat.max().item(),
    )
    return stats

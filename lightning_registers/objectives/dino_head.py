"""The DINO / iBOT projection head (DINOv2's ``DINOHead``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

PROTOTYPE_INITS = ("trunc_normal", "linear")


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2 normalization, then a weight-normalized linear layer onto the
    prototypes (``last_layer``; its direction ``weight_v`` and norm ``weight_g`` per prototype,
    written out rather than with a parametrization so that FSDP2 shards and the EMA updates
    plain parameters).

    Args:
        in_dim: backbone width.
        n_prototypes: outputs (DINOv2: 65536 for DINO and iBOT).
        hidden_dim: MLP hidden width.
        bottleneck_dim: width before the prototypes.
        n_layers: MLP layers (1 is a single linear map to the bottleneck).
        prototype_init: initial prototype directions, "trunc_normal" (std 0.02) or "linear"
            (``nn.Linear``'s default, uniform within 1/sqrt(bottleneck_dim), as DINOv2, whose
            last layer is made after its MLP init).
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 3,
        prototype_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if prototype_init not in PROTOTYPE_INITS:
            raise ValueError(
                f"prototype_init must be one of {PROTOTYPE_INITS}, got {prototype_init!r}"
            )
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < n_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes, prototype_init)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||).T`` without bias; ``g`` starts at 1 (DINOv2's last layer), ``v``
    as ``init`` says (see ``DINOHead``)."""

    def __init__(self, in_dim: int, out_dim: int, init: str = "trunc_normal") -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim))
        if init == "linear":
            nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's own init
        else:
            trunc_normal_(self.weight_v, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g[:, None] * F.normalize(self.weight_v, dim=1)
        return x @ weight.T

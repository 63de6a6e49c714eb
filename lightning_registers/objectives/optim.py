"""Optimizer parameter groups and optimizers shared by every objective."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "lamb")


def no_decay_names(module: nn.Module) -> set[str]:
    """Full names of parameters without weight decay: every 0/1-d tensor (norms, biases,
    LayerScale) and whatever a submodule lists in ``no_weight_decay()`` (position embedding,
    [CLS], registers, mask token, logit scale)."""
    names = {name for name, p in module.named_parameters() if p.ndim <= 1}
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay()}
    return names


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, with and without weight decay; each group carries ``weight_decay_scale`` so
    that a weight-decay schedule can set ``weight_decay = scale * value``."""
    skip = no_decay_names(module)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "weight_decay_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "weight_decay_scale": 0.0},
    ]


def build_optimizer(
    name: str,
    groups: Iterable[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW (torch) or LAMB (timm) over ``groups``."""
    groups = [g for g in groups if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if name == "lamb":
        from timm.optim import Lamb

        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")

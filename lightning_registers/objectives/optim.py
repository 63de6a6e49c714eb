"""Optimizer parameter groups, optimizers and the learning-rate scaling rules shared by every
objective."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

OPTIMIZERS = ("adamw", "lamb")
NO_DECAY_RULES = ("tokens", "open_clip", "dinov2")
"""Which parameters take no weight decay. ``tokens``: every 0/1-d tensor (norms, biases,
LayerScale) and whatever a submodule lists in ``no_weight_decay()`` (position embedding, [CLS],
registers, mask token, token embedding, logit scale), as timm and DeiT. ``open_clip``: what
open_clip's trainer exempts, the tensors below 2-d in its own layout (norms, biases, logit scale
and the class embedding, so here [CLS], registers and mask token); position and token
embeddings decay. ``dinov2``: only biases, norms and LayerScale (names ending in ``.bias`` or
holding ``norm`` or ``gamma``), as DINOv2's param groups; tokens and prototypes decay."""
LR_SCALINGS = ("linear", "sqrt")
"""Learning rate from the global batch: ``lr x batch / base`` (DeiT, base 512) or
``lr x sqrt(batch / base)`` (DINOv2, base 1024)."""
_TOKEN_VECTORS = ("cls_token", "register_tokens", "mask_token")


def check_choice(name: str, value, choices: tuple) -> None:
    """Fail with the field's name where ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def no_decay_names(module: nn.Module, rule: str = "tokens") -> set[str]:
    """Full names of the parameters without weight decay under ``rule`` (see NO_DECAY_RULES)."""
    check_choice("no_decay_rule", rule, NO_DECAY_RULES)
    params = dict(module.named_parameters())
    if rule == "dinov2":
        return {n for n in params if n.endswith(".bias") or "norm" in n or "gamma" in n}
    names = {name for name, p in params.items() if p.ndim <= 1}
    if rule == "open_clip":
        return names | {n for n in params if n.rsplit(".", 1)[-1] in _TOKEN_VECTORS}
    for prefix, sub in module.named_modules():
        if hasattr(sub, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in sub.no_weight_decay()}
    return names


def param_groups(module: nn.Module, weight_decay: float, rule: str = "tokens") -> list[dict]:
    """Two groups, with and without weight decay (``rule`` as in NO_DECAY_RULES); each group
    carries ``weight_decay_scale`` so that a weight-decay schedule can set
    ``weight_decay = scale * value``."""
    skip = no_decay_names(module, rule)
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


def scaled_lr(lr: float, rule: str | None, global_batch: int, base_batch: int) -> float:
    """``lr`` scaled from ``base_batch`` to ``global_batch`` by ``rule`` (None: unchanged)."""
    if rule is None:
        return lr
    check_choice("lr_scaling", rule, LR_SCALINGS)
    ratio = global_batch / base_batch
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def global_batch_size(trainer) -> int:
    """Samples per optimizer step over every rank: the per-device batch size times the world
    size the trainer actually runs with, times gradient accumulation."""
    batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if batch_size is None:
        raise ValueError("lr_scaling needs the per-device batch size: train with a datamodule")
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches


def peak_lr(hparams: Mapping, trainer) -> float:
    """The objective's peak learning rate: ``lr``, or ``lr`` scaled by ``lr_scaling`` from
    ``lr_base_batch`` to the global batch of this run."""
    rule = hparams.get("lr_scaling")
    if rule is None:
        return hparams["lr"]
    return scaled_lr(hparams["lr"], rule, global_batch_size(trainer), hparams["lr_base_batch"])

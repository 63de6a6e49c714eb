"""Per-step schedules: linear warmup then cosine, used for learning rate, weight decay,
temperatures and EMA momentum."""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, start: float, peak: float, end: float
) -> float:
    """``start`` → ``peak`` linearly over ``warmup_steps``, then cosine from ``peak`` to ``end``
    at ``total_steps`` (held at ``end`` after it)."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))


def run_length(trainer) -> tuple[int, float]:
    """(optimizer steps of the whole fit, optimizer steps per epoch) of ``trainer``."""
    total = trainer.estimated_stepping_batches
    if total == float("inf"):
        raise ValueError("the schedules need a finite run: set trainer.max_epochs or max_steps")
    epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else 1
    return int(total), total / max(epochs, 1)


def warmup_cosine_lr(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate from 0 to the optimizer's rate over ``warmup_steps``, then cosine to
    ``min_lr_ratio`` times it."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        return warmup_cosine(step, total_steps, warmup_steps, 0.0, 1.0, min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

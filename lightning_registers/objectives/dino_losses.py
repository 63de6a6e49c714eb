"""DINOv2's losses and teacher centering, written out because no library ships them: the DINO
loss over crop pairs, the iBOT loss on masked patches, the KoLeo regularizer, Sinkhorn-Knopp and
softmax-with-EMA-center teacher targets. Sums over samples are all-reduced across ranks when a
process group is running, so every rank computes the targets of the global batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over the ranks of a running process group (else unchanged)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor,
    temperature: float,
    iterations: int = 3,
    n_samples: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher targets (B, K) whose prototypes are used equally over the global batch and whose
    rows sum to 1 (DINOv2's ``sinkhorn_knopp_teacher``). ``n_samples``: rows over all ranks
    (default: B times the world size)."""
    q = torch.exp(teacher_logits.float() / temperature).T  # K x B
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    total = q.shape[1] * world if n_samples is None else n_samples
    k = q.shape[0]
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= total
    q *= total
    return q.T


class SoftmaxCenter(nn.Module):
    """Teacher targets ``softmax((logits - center) / temperature)`` with ``center`` an EMA of the
    mean teacher logits over the global batch (DINO's centering)."""

    def __init__(self, n_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        targets = F.softmax((teacher_logits.float() - self.center) / temperature, dim=-1)
        count = all_reduce_sum(torch.tensor(float(len(teacher_logits)), device=self.center.device))
        batch_center = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True)) / count
        self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)
        return targets


def cross_entropy(targets: torch.Tensor, student_logits: torch.Tensor, temperature: float):
    """Per-row cross-entropy of the student's tempered softmax against the targets."""
    return -(targets * F.log_softmax(student_logits.float() / temperature, dim=-1)).sum(dim=-1)


def dino_loss(
    student_logits: Sequence[torch.Tensor],
    teacher_targets: Sequence[torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Sum over (student crop, teacher crop) pairs of the batch-mean cross-entropy, skipping a
    global crop against itself, over the number of pairs. The first ``len(teacher_targets)``
    student crops are the global crops in the teacher's order; the rest are local crops. Equals
    DINOv2's global plus local DINO terms: as there, the local pairs count at least 1 in the
    divisor, so without local crops two global crops are divided by 2 + 1."""
    n_global = len(teacher_targets)
    total, global_pairs, local_pairs = 0.0, 0, 0
    for i, student in enumerate(student_logits):
        for j, target in enumerate(teacher_targets):
            if i == j:
                continue
            total = total + cross_entropy(target, student, temperature).mean()
            if i < n_global:
                global_pairs += 1
            else:
                local_pairs += 1
    return total / (global_pairs + max(local_pairs, 1))


def ibot_loss(
    student_logits: torch.Tensor,
    teacher_targets: torch.Tensor,
    masks: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """iBOT's masked-patch loss: logits and targets (M, K) of the masked patches (in the order of
    ``masks[masks]``), masks (B, N); each image's masked patches are averaged, then the images
    (unmasked ones count as zero), as DINOv2's ``forward_masked``."""
    per_patch = cross_entropy(teacher_targets, student_logits, temperature)
    per_image = masks.sum(dim=-1).clamp(min=1)
    weights = (1.0 / per_image)[:, None].expand_as(masks)[masks]
    return (per_patch * weights).sum() / masks.shape[0]


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo: minus the mean log distance of each L2-normalized feature to its nearest
    neighbour in the batch (Sablayrolles et al., 2019)."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    dots = x @ x.T
    dots.fill_diagonal_(-2.0)
    nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()


@torch.no_grad()
def ema_update(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], momentum: float):
    """``teacher = momentum * teacher + (1 - momentum) * student`` in place. FSDP2 parameters are
    updated through their local shards: no gather."""
    for t, s in zip(teacher, student, strict=True):
        t, s = (t.to_local(), s.to_local()) if hasattr(t, "to_local") else (t, s)
        # Two roundings, as the formula reads (a fused add with alpha can differ by an ulp).
        t.mul_(momentum).add_(s * (1 - momentum))

"""Test-time registers (Jiang, Dravid, Efros, Gandelsman, 2025): a few MLP "register neurons"
write the high-norm outliers; at inference an extra, untrained token takes their activations
and the patches lose them, which cleans the patch features without retraining.

Register neurons are found on the analysed images: outlier positions are the patch tokens that
an ``OutlierRule`` flags in the residual stream after ``mark_block``; each MLP hidden neuron of
the blocks up to it is scored by its mean absolute activation at those positions, and the
``top_k`` highest are kept."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..measures.norms import OutlierRule, token_norms
from .tokens import batches, device_of


@dataclass(frozen=True)
class RegisterNeuron:
    """One MLP hidden unit (``neuron`` of ``blocks[block].mlp``) and its score."""

    block: int
    neuron: int
    score: float


def _score_hooks(backbone: nn.Module, blocks: list[int], batch: dict) -> list:
    """Hooks that add each listed block's MLP hidden activations (the input of ``fc2``) at the
    batch's outlier positions (``batch["flags"]``, (B, P)) to ``batch["totals"][block]``."""
    r = backbone.num_prefix_tokens

    def add(index: int):
        def hook(module, args):
            hidden = args[0][:, r:][batch["flags"]].abs().float().sum(dim=0).cpu()
            totals = batch["totals"]
            totals[index] = totals.get(index, 0) + hidden

        return hook

    return [backbone.blocks[i].mlp.fc2.register_forward_pre_hook(add(i)) for i in blocks]


@torch.no_grad()
def find_register_neurons(
    backbone: nn.Module,
    images: torch.Tensor,
    top_k: int = 10,
    rule: OutlierRule | None = None,
    mark_block: int = -1,
    batch_size: int = 32,
) -> list[RegisterNeuron]:
    """The ``top_k`` register neurons, highest score first; empty when the rule flags no
    patch token at ``mark_block``."""
    rule = rule or OutlierRule()
    mark_block %= backbone.depth
    device = device_of(backbone)
    norms = torch.cat(
        [
            token_norms(backbone, batch, [mark_block])[f"block{mark_block:02d}"]["patches"].cpu()
            for batch in batches(images, batch_size, device)
        ]
    )
    outliers = rule.mask(norms)
    if not outliers.any():
        return []
    blocks = list(range(mark_block + 1))
    batch_state: dict = {"totals": {}}
    handles = _score_hooks(backbone, blocks, batch_state)
    try:
        for start in range(0, len(images), batch_size):
            batch_state["flags"] = outliers[start : start + batch_size].to(device)
            backbone(images[start : start + batch_size].to(device))
    finally:
        for handle in handles:
            handle.remove()
    totals = batch_state["totals"]
    scores = torch.stack([totals[b] for b in blocks]) / outliers.sum()
    best = scores.flatten().topk(min(top_k, scores.numel()))
    width = scores.shape[1]
    return [
        RegisterNeuron(int(i) // width, int(i) % width, float(v))
        for v, i in zip(best.values, best.indices, strict=True)
    ]


def add_test_time_register(backbone: nn.Module, neurons: list[RegisterNeuron]) -> nn.Module:
    """A copy of ``backbone`` with one more register: zero-initialised, placed after the
    trained registers (so that every measure sees it as a register). In each forward, every
    register neuron's largest activation over the patches is written into that token and the
    neuron is zeroed on the patches, image by image (any batch size)."""
    model = copy.deepcopy(backbone)
    slot = model.num_prefix_tokens  # the new token's index; patches start after it
    old = model.register_tokens
    zero = torch.zeros(1, 1, model.embed_dim, dtype=model.cls_token.dtype)
    tokens = zero if old is None else torch.cat([old.data, zero], dim=1)
    model.register_tokens = nn.Parameter(tokens, requires_grad=False)
    model.num_registers += 1
    model.config = dict(model.config, num_registers=model.num_registers)
    model.test_time_neurons = list(neurons)

    def move(indices: torch.Tensor):
        def hook(module, args):
            hidden = args[0].clone()
            patches = hidden[:, slot + 1 :, indices]
            hidden[:, slot, indices] = patches.max(dim=1).values
            hidden[:, slot + 1 :, indices] = 0
            return (hidden,)

        return hook

    by_block: dict[int, list[int]] = {}
    for n in neurons:
        by_block.setdefault(n.block, []).append(n.neuron)
    for block, indices in by_block.items():
        model.blocks[block].mlp.fc2.register_forward_pre_hook(move(torch.tensor(indices)))
    return model

"""Test-time registers (Jiang, Dravid, Efros, Gandelsman, 2025): a few MLP "register neurons"
write the high-norm outliers; at inference an extra, untrained token takes their activations
and the patches lose them, which cleans the patch features without retraining.

Register neurons are found on the analysed images. Outlier positions are the tokens (``all``,
as the reference code, or ``patches`` only) whose norm after block ``layer`` an ``OutlierRule``
flags. Each MLP hidden neuron (the input of ``fc2``) of the blocks up to ``top_layer`` is scored
by its mean absolute activation at those positions, ``pooled`` over all of them or as the
reference does (``per_image``: a mean per image, averaged over the images with outliers);
``sparsity`` keeps, per image, only the neurons that at least half of the tokens activate below
0.5 (the filter the reference's notebook applies). The ``top_k`` highest are kept.

What the test-time register gets (``values``): ``neuron_max``, each register neuron's own
largest activation over the patches, or ``sign_max`` (the reference's rule), one value per
block: the activation of largest magnitude, with its sign, over all tokens and that block's
register neurons. Either way the neurons are zeroed on the patches. Both work image by image
in a batch of any size (the reference's hook reads the first image of a batch only)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..measures.norms import OutlierRule, layer_name, token_norms
from ..models import ViTConfig
from .tokens import Images, batches, device_of

VALUE_RULES = ("neuron_max", "sign_max")
TOKENS = ("patches", "all")
AVERAGES = ("pooled", "per_image")
SPARSITY_SHARE = 0.5  # the reference's sparsity filter: at least this share of the tokens ...
SPARSITY_ACTIVATION = 0.5  # ... activate the neuron below this


@dataclass(frozen=True)
class RegisterNeuron:
    """One MLP hidden unit (``neuron`` of ``blocks[block].mlp``) and its score."""

    block: int
    neuron: int
    score: float


@dataclass(frozen=True)
class FamilyConfig:
    """The reference code's settings for one model family (its ``configs/*.yaml``): outliers
    are tokens with norm above ``threshold`` after block ``layer``; register neurons are the
    ``top_k`` best of blocks up to ``top_layer``."""

    name: str
    threshold: float
    layer: int
    top_layer: int
    top_k: int


# Keyed by (width, depth, patch size, norm before the first block): what tells the families
# apart whatever the checkpoint format. The paper quotes 75 for CLIP; its code uses 30.
FAMILIES = {
    (768, 12, 16, True): FamilyConfig("CLIP ViT-B/16 (OpenAI, OpenCLIP)", 30.0, -1, 5, 10),
    (1024, 24, 14, False): FamilyConfig("DINOv2 ViT-L/14", 150.0, -2, 17, 50),
}


def model_family(config: ViTConfig) -> FamilyConfig | None:
    """The reference settings of a backbone's family (from its ``config``), or None."""
    key = (config.embed_dim, config.depth, config.patch_size, config.pre_norm)
    return FAMILIES.get(key)


def all_token_norms(kinds: dict[str, torch.Tensor]) -> torch.Tensor:
    """One layer's ``token_norms`` as (B, T): [CLS], registers, patches."""
    return torch.cat([kinds["cls"][:, None], kinds["registers"], kinds["patches"]], 1)


def outlier_flags(
    norms: torch.Tensor, rule: OutlierRule, tokens: str = "patches", num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Flags (N, T) of the tokens of ``norms`` (N, T; ``all_token_norms``) that ``rule``
    flags, judged among ``all`` tokens or the ``patches`` only (the others then unflagged)."""
    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")
    if tokens == "all":
        return rule.mask(norms)
    r = num_prefix_tokens
    flags = torch.zeros_like(norms, dtype=torch.bool)
    flags[:, r:] = rule.mask(norms[:, r:])
    return flags


@torch.no_grad()
def outlier_tokens(
    backbone: nn.Module,
    images: Images,
    rule: OutlierRule,
    layer: int = -1,
    tokens: str = "patches",
    batch_size: int = 32,
) -> torch.Tensor:
    """Flags (N, T) over every token ([CLS], registers, patches) of the tokens whose norm after
    block ``layer`` ``rule`` flags, judged among ``all`` tokens or the ``patches`` only (the
    others then unflagged)."""
    if tokens not in TOKENS:
        raise ValueError(f"tokens must be one of {TOKENS}, got {tokens!r}")
    layer %= backbone.depth
    parts = []
    for batch in batches(images, batch_size, device_of(backbone)):
        parts.append(all_token_norms(token_norms(backbone, batch, [layer])[layer_name(layer)]))
    return outlier_flags(torch.cat(parts).cpu(), rule, tokens, backbone.num_prefix_tokens)


class NeuronScores:
    """Scores of the MLP hidden neurons (the input of ``fc2``) of ``blocks`` at the outlier
    positions ``flags`` (N, T), added up over forwards of the images in order: while open
    (``with``), hooks read each forward's activations, and ``at`` says which images the next
    forward holds. ``per_image`` averages each image's positions first; ``sparsity`` is the
    reference notebook's filter (see the module)."""

    def __init__(
        self,
        backbone: nn.Module,
        flags: torch.Tensor,
        blocks: range,
        per_image: bool = False,
        sparsity: bool = False,
    ) -> None:
        self.backbone, self.flags, self.blocks = backbone, flags, blocks
        self.per_image, self.sparsity = per_image, sparsity
        self.width = backbone.blocks[0].mlp.fc2.in_features
        self.totals = torch.zeros(len(blocks), self.width)
        self._current = flags[:0]
        self._handles: list = []

    def at(self, start: int, count: int) -> None:
        """The next forward holds images ``start`` to ``start + count``."""
        self._current = self.flags[start : start + count].to(device_of(self.backbone))

    def _hook(self, index: int):
        def hook(module, args):
            hidden = args[0].float()  # (B, T, H): the MLP's hidden activations
            flags = self._current.to(hidden.dtype)
            sums = torch.einsum("bt,bth->bh", flags, hidden.abs())
            if self.sparsity:
                low = (hidden < SPARSITY_ACTIVATION).sum(dim=1)
                sums = sums * (low >= SPARSITY_SHARE * hidden.shape[1])
            if self.per_image:
                counts = flags.sum(dim=1)
                sums = sums[counts > 0] / counts[counts > 0, None]
            self.totals[index] += sums.sum(dim=0).cpu()

        return hook

    def __enter__(self) -> NeuronScores:
        self._handles = [
            self.backbone.blocks[i].mlp.fc2.register_forward_pre_hook(self._hook(i))
            for i in self.blocks
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def best(self, top_k: int) -> list[RegisterNeuron]:
        """The ``top_k`` register neurons, highest score first (equal scores: lower block, then
        lower neuron first)."""
        counted = self.flags.any(dim=1).sum() if self.per_image else self.flags.sum()
        scores = (self.totals / counted).flatten()
        best = torch.argsort(scores, descending=True, stable=True)[:top_k]
        width = self.width
        return [RegisterNeuron(int(i) // width, int(i) % width, float(scores[i])) for i in best]


@torch.no_grad()
def find_register_neurons(
    backbone: nn.Module,
    images: Images,
    top_k: int = 10,
    rule: OutlierRule | None = None,
    layer: int = -1,
    batch_size: int = 32,
    tokens: str = "patches",
    top_layer: int | None = None,
    average: str = "pooled",
    sparsity: bool = False,
) -> list[RegisterNeuron]:
    """The ``top_k`` register neurons, highest score first (equal scores: lower block, then
    lower neuron first); empty when ``rule`` flags no token. ``top_layer`` defaults to
    ``layer``."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    rule = rule or OutlierRule()
    flags = outlier_tokens(backbone, images, rule, layer, tokens, batch_size)
    if not flags.any():
        return []
    top = layer if top_layer is None else top_layer
    blocks = range(top % backbone.depth + 1)
    start = 0
    with NeuronScores(backbone, flags, blocks, average == "per_image", sparsity) as scores:
        for batch in batches(images, batch_size, device_of(backbone)):
            scores.at(start, len(batch))
            backbone(batch)
            start += len(batch)
    return scores.best(top_k)


def sign_max(values: torch.Tensor) -> torch.Tensor:
    """Per row of ``values`` (B, ...), the entry of largest magnitude with its sign (the
    negative one where a maximum and a minimum are equally large, as the reference)."""
    flat = values.flatten(1)
    high, low = flat.max(dim=1).values, flat.min(dim=1).values
    return torch.where(high.abs() > low.abs(), high, low)


def add_test_time_register(
    backbone: nn.Module, neurons: list[RegisterNeuron], values: str = "neuron_max"
) -> nn.Module:
    """A copy of ``backbone`` with one more register: zero-initialised, placed after the
    trained registers (so that every measure sees it as a register). In each forward, the
    register neurons' activations are written into that token by the rule ``values``
    (``neuron_max`` or ``sign_max``) and zeroed on the patches, image by image."""
    if values not in VALUE_RULES:
        raise ValueError(f"values must be one of {VALUE_RULES}, got {values!r}")
    model = copy.deepcopy(backbone)
    slot = model.num_prefix_tokens  # the new token's index; patches start after it
    old = model.register_tokens
    zero = torch.zeros(1, 1, model.embed_dim, dtype=model.cls_token.dtype)
    tokens = zero if old is None else torch.cat([old.data, zero], dim=1)
    model.register_tokens = nn.Parameter(tokens, requires_grad=False)
    model.config = model.config.replace(num_registers=model.num_registers + 1)
    model.test_time_neurons = list(neurons)
    model.test_time_values = values

    def move(indices: torch.Tensor):
        def hook(module, args):
            hidden = args[0].clone()
            chosen = hidden[:, :, indices]
            if values == "sign_max":
                hidden[:, slot, indices] = sign_max(chosen)[:, None]
            else:
                hidden[:, slot, indices] = chosen[:, slot + 1 :].max(dim=1).values
            hidden[:, slot + 1 :, indices] = 0
            return (hidden,)

        return hook

    by_block: dict[int, list[int]] = {}
    for n in neurons:
        by_block.setdefault(n.block, []).append(n.neuron)
    for block, indices in by_block.items():
        model.blocks[block].mlp.fc2.register_forward_pre_hook(move(torch.tensor(indices)))
    return model

"""What an analysis runs with, and its protocol: the choices where our measurements and the
reference code of LOST (valeoai/LOST) and of test-time registers
(nickjiang2378/test-time-registers) differ. ``ours`` keeps what works on any model and any
batch; ``reference`` computes what the authors' code computes, so that numbers compare with
the papers' tables."""

from __future__ import annotations

from dataclasses import dataclass

from ..measures.norms import RULES, OutlierRule
from .lost import CORLOC_OVER, FEATURES, LOST_INPUTS, TIES
from .test_time_registers import AVERAGES, TOKENS, VALUE_RULES

# The choices each protocol makes (model-dependent numbers are resolved per backbone).
PROTOCOLS: dict[str, dict] = {
    "ours": dict(
        ttr_values="neuron_max",
        ttr_tokens="patches",
        ttr_average="pooled",
        ttr_sparsity=False,
        lost_input="square",
        lost_ties="stable",
        corloc_over="boxed",
    ),
    "reference": dict(
        ttr_values="sign_max",
        ttr_tokens="all",
        ttr_average="per_image",
        ttr_sparsity=True,
        lost_input="padded",
        lost_ties="reference",
        corloc_over="all",
    ),
}
CHOICES = {
    "ttr_values": VALUE_RULES,
    "ttr_tokens": TOKENS,
    "ttr_average": AVERAGES,
    "ttr_sparsity": (False, True),
    "lost_input": LOST_INPUTS,
    "lost_ties": TIES,
    "corloc_over": CORLOC_OVER,
}
# Every setting with a fixed set of values: the protocol's choices and three more.
ALLOWED = {"protocol": tuple(PROTOCOLS), "rule": RULES, "lost_features": FEATURES, **CHOICES}
REFERENCE_LOST_K = 100  # main_lost.py's --k_patches
REFERENCE_IOU_EPS = 1e-7  # the reference's IoU adds it to box heights and to the union


@dataclass
class AnalysisSettings:
    """What the measurements use. ``None`` leaves a choice to the ``protocol``.

    Args:
        protocol: ``ours`` or ``reference`` (see ``PROTOCOLS``); the per-measure choices
            below override it one by one.
        rule: how high-norm tokens are told from normal ones in the split measurements
            (neighbours, probes, attention; test-time registers under ``ours``): ``relative``
            or ``absolute``.
        threshold: absolute norm cut (the paper's 150).
        factor: relative cut, times the median patch norm.
        lost_features: ``keys`` (DINOv2 in the paper), ``values`` (DeiT-III, OpenCLIP) or
            ``queries`` of the last block.
        lost_k: LOST's seed-expansion candidates (``ours``: in proportion to the grid;
            ``reference``: 100).
        gram_bias: added to LOST's Gram matrix.
        lost_input: ``square`` (resized to the training size, as every other measure) or
            ``padded`` (full resolution, zero-padded to a patch multiple).
        lost_ties: order of patches of equal degree: ``stable`` (lowest index first) or
            ``reference`` (the reference's ``argsort``).
        corloc_over: CorLoc's denominator: ``boxed`` (images with boxes) or ``all`` (an image
            without boxes is a miss).
        no_hard: drop VOC's difficult and truncated objects, and leave out the images left
            without boxes (the reference's ``--no_hard``).
        ttr_neurons: register neurons moved to the test-time register (``ours``: 10;
            ``reference``: the model family's, else 10).
        ttr_values: what the test-time register gets: ``neuron_max`` (each neuron's largest
            activation over the patches) or ``sign_max`` (one value per block: the signed
            largest-magnitude activation over all tokens and that block's register neurons).
        ttr_tokens: where outliers are looked for: ``patches`` or ``all`` tokens.
        ttr_average: neuron scores over ``pooled`` outlier positions or ``per_image`` means
            averaged over the images with outliers.
        ttr_sparsity: keep, per image, only neurons that at least half of the tokens activate
            below 0.5 (the reference notebook's filter).
        ttr_layer: block whose output marks the outliers (default: the model family's under
            ``reference``, else the last).
        ttr_threshold: absolute norm cut of an outlier (default: ``ours``: ``rule``;
            ``reference``: the model family's, else ``factor`` x the median token norm).
        ttr_top_layer: highest block whose neurons may be chosen (default: ``ours``: the
            outlier block; ``reference``: the model family's, else the first block with
            high-norm patches).
        attention_images: images drawn in the attention figures.
        batch_size: images per forward pass.
    """

    protocol: str = "ours"
    rule: str = "relative"
    threshold: float = 150.0
    factor: float = 3.0
    lost_features: str = "keys"
    lost_k: int | None = None
    gram_bias: float = 0.0
    lost_input: str | None = None
    lost_ties: str | None = None
    corloc_over: str | None = None
    no_hard: bool = False
    ttr_neurons: int | None = None
    ttr_values: str | None = None
    ttr_tokens: str | None = None
    ttr_average: str | None = None
    ttr_sparsity: bool | None = None
    ttr_layer: int | None = None
    ttr_threshold: float | None = None
    ttr_top_layer: int | None = None
    attention_images: int = 8
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name, allowed in ALLOWED.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("lost_k", "ttr_neurons", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    @property
    def outlier_rule(self) -> OutlierRule:
        return OutlierRule(self.rule, self.threshold, self.factor)

    def choice(self, name: str):
        """A per-measure choice: the one given, else the protocol's."""
        value = getattr(self, name)
        return PROTOCOLS[self.protocol][name] if value is None else value

    @property
    def reference(self) -> bool:
        return self.protocol == "reference"

    @property
    def iou_eps(self) -> float:
        return REFERENCE_IOU_EPS if self.reference else 0.0

    def protocol_summary(self) -> dict:
        """The protocol as run: its name (``... (custom)`` where a flag overrides a choice or a
        number of it) and every choice, for the summary, so that summaries are never compared
        across protocols."""
        chosen = {name: self.choice(name) for name in CHOICES}
        numbers = (self.lost_k, self.ttr_neurons, self.ttr_layer, self.ttr_threshold)
        same = (
            chosen == PROTOCOLS[self.protocol]
            and not self.no_hard
            and self.gram_bias == 0
            and all(n is None for n in (*numbers, self.ttr_top_layer))
        )
        return {
            "name": self.protocol if same else f"{self.protocol} (custom)",
            **chosen,
            "no_hard": self.no_hard,
            "iou_eps": self.iou_eps,
        }

"""The measurements as plain functions on tensors and modules: token norms, the outlier rule
and high-norm statistics, attention of the prefix tokens, and figures. No Lightning here: a
notebook measures a backbone with these directly; the callbacks and the analysis build on them."""

from .attention import attention_grids, prefix_attention, query_names
from .norms import OUTPUT, RULES, TOKEN_KINDS, OutlierRule, high_norm_stats, layer_name, token_norms

__all__ = [
    "OUTPUT",
    "RULES",
    "TOKEN_KINDS",
    "OutlierRule",
    "attention_grids",
    "high_norm_stats",
    "layer_name",
    "prefix_attention",
    "query_names",
    "token_norms",
]

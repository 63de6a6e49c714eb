"""Monitoring callbacks: token norms, attention maps and artifact emergence in TensorBoard."""

from .attention import AttentionMapMonitor, prefix_attention
from .emergence import ArtifactEmergence
from .norms import OutlierRule, TokenNormMonitor, high_norm_stats, token_norms
from .probe import ProbeCallback, monitored_backbones, probing

__all__ = [
    "ArtifactEmergence",
    "AttentionMapMonitor",
    "OutlierRule",
    "ProbeCallback",
    "TokenNormMonitor",
    "high_norm_stats",
    "monitored_backbones",
    "probing",
    "prefix_attention",
    "token_norms",
]

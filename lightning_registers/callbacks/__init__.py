"""Monitoring callbacks: thin Lightning adapters over ``measures`` that log token norms,
attention maps and artifact emergence to TensorBoard."""

from .attention import AttentionMapMonitor
from .emergence import ArtifactEmergence
from .norms import TokenNormMonitor
from .probe import ProbeCallback, monitored_backbones, probing

__all__ = [
    "ArtifactEmergence",
    "AttentionMapMonitor",
    "ProbeCallback",
    "TokenNormMonitor",
    "monitored_backbones",
    "probing",
]

"""The register-ViT backbone, its heads and checkpoint conversion."""

from .config import ARCHS, ViTConfig, patch_grid
from .convert import (
    LAYOUTS,
    CheckpointMismatchError,
    build_timm_vit,
    convert_state_dict,
    create_timm_model,
    from_dinov2,
    from_open_clip,
    from_timm,
    load_pretrained,
    timm_config,
    timm_state_dict,
    to_timm,
    unwrap_state_dict,
)
from .vit import RegisterViT

__all__ = [
    "ARCHS",
    "LAYOUTS",
    "CheckpointMismatchError",
    "RegisterViT",
    "ViTConfig",
    "build_timm_vit",
    "convert_state_dict",
    "create_timm_model",
    "from_dinov2",
    "from_open_clip",
    "from_timm",
    "load_pretrained",
    "patch_grid",
    "timm_config",
    "timm_state_dict",
    "to_timm",
    "unwrap_state_dict",
]

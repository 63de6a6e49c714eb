"""The architecture of a RegisterViT as one frozen record: the model, its teacher copy, export,
loading and the analysis all read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ARCHS: dict[str, dict] = {
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, ffn="mlp"),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, ffn="mlp"),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, ffn="mlp"),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, ffn="mlp"),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}
FFN_TYPES = ("mlp", "swiglu")


def patch_grid(size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Patches along the height and the width of an image of ``size`` (height, width)."""
    if size[0] % patch_size or size[1] % patch_size:
        raise ValueError(
            f"image size {size[0]}x{size[1]} is not divisible by patch size {patch_size}"
        )
    return size[0] // patch_size, size[1] // patch_size


@dataclass(frozen=True)
class ViTConfig:
    """The resolved constructor arguments of a ``RegisterViT`` (see its ``Args``), checked:
    ``RegisterViT.from_config(config)`` rebuilds the model, ``as_kwargs()`` is the plain data
    that checkpoints and exports store."""

    arch: str = "vit_small"
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    num_registers: int = 4
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    ffn: str = "mlp"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layerscale_init: float | None = None
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    norm_eps: float = 1e-6
    pre_norm: bool = False
    patch_bias: bool = True
    in_chans: int = 3
    interpolate_antialias: bool = True
    interpolate_offset: float = 0.0
    grad_checkpointing: bool = False

    @classmethod
    def resolve(cls, **kwargs) -> ViTConfig:
        """The config of ``RegisterViT(**kwargs)``: the named ``arch`` fills the sizes not
        given (None), ``img_size`` may be one int."""
        arch = kwargs.get("arch", cls.arch)
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        for key, value in ARCHS[arch].items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        size = kwargs.get("img_size", cls.img_size)
        kwargs["img_size"] = (size, size) if isinstance(size, int) else tuple(size)
        return cls(**kwargs)

    def __post_init__(self) -> None:
        if self.ffn not in FFN_TYPES:
            raise ValueError(f"ffn must be one of {FFN_TYPES}, got {self.ffn!r}")
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        patch_grid(self.img_size, self.patch_size)

    def replace(self, **changes) -> ViTConfig:
        """This config with ``changes``."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict:
        """Plain constructor arguments (a square ``img_size`` as one int)."""
        kwargs = dataclasses.asdict(self)
        height, width = self.img_size
        kwargs["img_size"] = height if height == width else [height, width]
        return kwargs

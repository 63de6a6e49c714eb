"""The Vision Transformer with register tokens shared by every objective.

Token order is ``[CLS] + registers + patches``. Registers are learnable like [CLS], get no
position embedding and are dropped at the output (Darcet et al., "Vision Transformers Need
Registers", 2024). ``num_registers=0`` is the plain ViT on the same code path. Attribute and
method names follow DINOv2 so that its users feel at home; the layers come from timm.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, GluMlp, LayerScale, Mlp, PatchEmbed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ViTConfig, patch_grid
from .pos_embed import resample_patch_pos_embed


def swiglu_hidden_features(embed_dim: int, mlp_ratio: float) -> int:
    """Hidden width of one SwiGLU branch as DINOv2 sizes it (2/3 of the MLP, multiple of 8)."""
    return (int(embed_dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


class Attention(nn.Module):
    """Multi-head self-attention through SDPA; explicit softmax weights only when asked for."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.keep_attention = False
        """When set, each forward computes explicit weights and keeps them in ``attention``
        (``RegisterViT.capture_attention`` sets it; the model's own forward runs, so FSDP2
        gathers parameters as in training)."""
        self.attention: torch.Tensor | None = None
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.keep_attention:
            self.attention = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attention @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale and stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        qkv_bias: bool = True,
        layerscale_init: float | None = None,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn == "swiglu":
            hidden = swiglu_hidden_features(dim, mlp_ratio)
            self.mlp = GluMlp(dim, 2 * hidden, act_layer=nn.SiLU, gate_last=False)
        else:
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class RegisterViT(nn.Module):
    """Vision Transformer with ``num_registers`` register tokens.

    Args:
        arch: named size (vit_tiny, vit_small, vit_base, vit_large, vit_giant2); the explicit
            ``embed_dim``/``depth``/``num_heads``/``ffn`` below override it when given.
        img_size: training image size (int or (height, width)); sets the position-embedding grid.
        patch_size: side of a square patch in pixels.
        num_registers: register tokens between [CLS] and the patches; 0 is the plain ViT.
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        ffn: feed-forward type, "mlp" (GELU) or "swiglu" (DINOv2 ViT-g).
        mlp_ratio: feed-forward hidden width over ``embed_dim``.
        qkv_bias: bias in the query/key/value projection.
        layerscale_init: LayerScale initial value; None disables LayerScale.
        drop_path_rate: stochastic-depth rate of the last block (linear from 0 over depth).
        drop_path_uniform: the same stochastic-depth rate in every block (DINOv2's ViT-L/g).
        norm_eps: LayerNorm epsilon (1e-6 as DINOv2/timm; OpenCLIP uses 1e-5).
        pre_norm: a LayerNorm after the position embedding (OpenCLIP's ``ln_pre``).
        patch_bias: a bias in the patch embedding (OpenCLIP's ``conv1`` has none).
        in_chans: input channels.
        interpolate_antialias: anti-alias the bicubic position-embedding interpolation (the
            paper's setting); False with ``interpolate_offset=0.1`` matches released DINOv2.
        interpolate_offset: DINOv2's scale-factor offset for interpolation; 0 uses exact sizes.
        grad_checkpointing: recompute each block in the backward pass to save memory.
    """

    def __init__(
        self,
        arch: str = "vit_small",
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        num_registers: int = 4,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        ffn: str | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layerscale_init: float | None = None,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        norm_eps: float = 1e-6,
        pre_norm: bool = False,
        patch_bias: bool = True,
        in_chans: int = 3,
        interpolate_antialias: bool = True,
        interpolate_offset: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.config = ViTConfig.resolve(
            arch=arch,
            img_size=img_size,
            patch_size=patch_size,
            num_registers=num_registers,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            ffn=ffn,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            layerscale_init=layerscale_init,
            drop_path_rate=drop_path_rate,
            drop_path_uniform=drop_path_uniform,
            norm_eps=norm_eps,
            pre_norm=pre_norm,
            patch_bias=patch_bias,
            in_chans=in_chans,
            interpolate_antialias=interpolate_antialias,
            interpolate_offset=interpolate_offset,
            grad_checkpointing=grad_checkpointing,
        )
        """The resolved architecture: ``RegisterViT.from_config(config)`` rebuilds the model."""
        c = self.config
        self.patch_embed = PatchEmbed(
            c.img_size,
            c.patch_size,
            c.in_chans,
            c.embed_dim,
            bias=c.patch_bias,
            strict_img_size=False,
        )
        self.grid_size = self.patch_embed.grid_size
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, c.num_registers, c.embed_dim)) if c.num_registers else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, c.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, c.embed_dim))
        self.norm_pre = nn.LayerNorm(c.embed_dim, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        block = partial(
            Block,
            c.embed_dim,
            c.num_heads,
            mlp_ratio=c.mlp_ratio,
            ffn=c.ffn,
            qkv_bias=c.qkv_bias,
            layerscale_init=c.layerscale_init,
            norm_eps=c.norm_eps,
        )
        if c.drop_path_uniform:
            rates = [c.drop_path_rate] * c.depth
        else:
            rates = torch.linspace(0, c.drop_path_rate, c.depth).tolist()
        self.blocks = nn.ModuleList(block(drop_path=rate) for rate in rates)
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.norm_eps)
        self.init_weights()

    @classmethod
    def from_config(cls, config: ViTConfig) -> RegisterViT:
        """The model of ``config`` (fresh weights)."""
        return cls(**config.as_kwargs())

    # The sizes every caller reads, under DINOv2's names; the rest is in ``config``.
    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def num_registers(self) -> int:
        return self.config.num_registers

    @property
    def img_size(self) -> tuple[int, int]:
        return self.config.img_size

    @property
    def num_prefix_tokens(self) -> int:
        """[CLS] plus registers: the tokens before the patches."""
        return 1 + self.num_registers

    def init_weights(self) -> None:
        """Truncated-normal init as DINOv2 and timm do; [CLS] and registers start near zero."""
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, LayerScale):
                module.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay (besides norms and biases)."""
        names = {"pos_embed", "cls_token", "mask_token"}
        if self.register_tokens is not None:
            names.add("register_tokens")
        return names

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Switch per-block activation checkpointing on or off."""
        self.config = self.config.replace(grad_checkpointing=enable)

    def patch_grid(self, images: torch.Tensor) -> tuple[int, int]:
        """Patches along the height and the width of ``images`` (..., H, W)."""
        return patch_grid(tuple(images.shape[-2:]), self.patch_size)

    def layer_of(self, name: str) -> int:
        """The layer of parameter ``name`` (as ``named_parameters`` names it), as layer-wise
        lr decay counts them: the embeddings 0, block i i + 1, the rest (final norm) the top,
        ``depth + 1``."""
        embeddings = ("patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens")
        if name.split(".")[0] in embeddings:
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.depth + 1

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (the transformer blocks)."""
        return list(self.blocks)

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embedding for a ``grid`` of patches; [CLS]'s entry is kept as it is."""
        c = self.config
        if tuple(grid) == tuple(self.grid_size) and c.interpolate_offset == 0:
            return self.pos_embed
        patch_pos = resample_patch_pos_embed(
            self.pos_embed[:, 1:],
            self.grid_size,
            grid,
            c.interpolate_antialias,
            c.interpolate_offset,
        )
        return torch.cat([self.pos_embed[:, :1], patch_pos], dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patchify, replace masked patches by the mask token, add positions, insert registers."""
        if x.ndim != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        grid = self.patch_grid(x)
        x = self.patch_embed(x)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(
                    f"masks must have shape (batch, patches) = {tuple(x.shape[:2])}, "
                    f"got {tuple(masks.shape)}"
                )
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(grid).to(x.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        return self.norm_pre(x)

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.config.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> dict:
        """All output tokens, normalized and split by kind, plus the pre-norm sequence."""
        x = self.prepare_tokens(x, masks)
        for block in self.blocks:
            x = self._run_block(block, x)
        x_norm = self.norm(x)
        r = self.num_prefix_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:r],
            "x_norm_patchtokens": x_norm[:, r:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward(
        self, x: torch.Tensor, masks: torch.Tensor | None = None, return_features: bool = False
    ) -> torch.Tensor | dict:
        """The normalized [CLS] token, (B, D); with ``return_features`` the whole
        ``forward_features`` dict (the call that FSDP2 hooks gather parameters for, so training
        code calls the module rather than ``forward_features``)."""
        features = self.forward_features(x, masks)
        return features if return_features else features["x_norm_clstoken"]

    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        indices = list(range(self.depth - n, self.depth)) if isinstance(n, int) else list(n)
        bad = [i for i in indices if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for depth {self.depth}")
        return sorted(i % self.depth for i in indices)

    def get_block_outputs(self, x: torch.Tensor, n: int | Sequence[int] = 1) -> list[torch.Tensor]:
        """The residual stream (B, 1+R+N, D) after the last ``n`` blocks or the blocks listed."""
        indices = self._block_indices(n)
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks[: indices[-1] + 1]):
            x = self._run_block(block, x)
            if i in indices:
                outputs.append(x)
        return outputs

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last ``n`` blocks (or the blocks listed), as DINOv2 returns them."""
        grid = self.patch_grid(x)
        outputs = self.get_block_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, self.num_prefix_tokens :] for out in outputs]
        if reshape:
            patches = [p.reshape(p.shape[0], *grid, -1).permute(0, 3, 1, 2) for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)

    @contextmanager
    def capture_attention(self, blocks: Sequence[int] = (-1,)) -> Iterator[dict[int, torch.Tensor]]:
        """While open, each forward of the model keeps the softmax attention weights
        (B, heads, T, T) of the listed blocks (negative from the end) in the yielded dict, by
        block index. The one way to read attention: the model's own forward runs, so FSDP2
        gathers parameters as in training, and training pays nothing outside it."""
        captured: dict[int, torch.Tensor] = {}
        attentions = {i: self.blocks[i].attn for i in self._block_indices(blocks)}

        def keep(index: int):
            def hook(module, args, output):
                captured[index] = module.attention
                module.attention = None

            return hook

        handles = [attn.register_forward_hook(keep(i)) for i, attn in attentions.items()]
        for attn in attentions.values():
            attn.keep_attention = True
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()
            for attn in attentions.values():
                attn.keep_attention, attn.attention = False, None

    def get_last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention weights of the last block, (B, heads, T, T)."""
        with self.capture_attention() as attention:
            self(x)
        return attention[self.depth - 1]

    def flops_per_image(self, img_size: tuple[int, int] | None = None) -> int:
        """Forward multiply-accumulates times two for one image (matmuls only)."""
        c = self.config
        h, w = patch_grid(img_size or c.img_size, c.patch_size)
        tokens = self.num_prefix_tokens + h * w
        d = c.embed_dim
        if c.ffn == "swiglu":
            ffn = 3 * d * swiglu_hidden_features(d, c.mlp_ratio)
        else:
            ffn = 2 * d * int(d * c.mlp_ratio)
        per_block = tokens * (4 * d * d + ffn) + 2 * tokens * tokens * d
        patchify = h * w * d * c.in_chans * c.patch_size**2
        return 2 * (c.depth * per_block + patchify)

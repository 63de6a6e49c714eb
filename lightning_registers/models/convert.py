"""Checkpoint conversion between RegisterViT and the DINOv2-hub, timm and OpenCLIP layouts.

RegisterViT's own layout is DINOv2's (``cls_token``, ``register_tokens``, ``pos_embed`` over
[CLS] and patches, ``blocks.i.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2}``),
except for SwiGLU weights, which use timm's ``fc1``/``fc2`` names. Constant additions that other
layouts put elsewhere (a position embedding on [CLS] or on registers) are folded into the tokens,
so every conversion computes exactly what the source model computes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import partial

import torch
from torch import nn

from .pos_embed import resample_patch_pos_embed
from .vit import RegisterViT

LAYOUTS = ("ours", "dinov2", "timm", "open_clip")
# Keys of heads and projections that sit beside a backbone in released checkpoints.
_HEAD_KEYS = re.compile(r"^(head\.|head_drop\.|fc_norm\.|proj$|attn_pool\.)")


class CheckpointMismatchError(KeyError):
    """A state dict whose keys do not match the model; names every missing and unexpected key."""

    def __init__(self, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {', '.join(shapes)}")
        super().__init__("state dict does not match RegisterViT (" + "; ".join(parts) + ")")

    def __str__(self) -> str:
        return self.args[0]


def unwrap_state_dict(checkpoint: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: looks inside ``state_dict``/``model``/``teacher`` entries,
    strips DDP's ``module.`` and keeps only keys under ``prefix`` (with the prefix removed)."""
    for key in ("state_dict", "model", "teacher"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
    out = {}
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = k.removeprefix("module.")
        if k.startswith(prefix):
            out[k[len(prefix) :]] = v
    return out


def from_dinov2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 hub (or DINOv2 training, block-chunked) layout to ours."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        k = re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k)
        k = re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)
        out[k] = v
    return out


def _is_square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def from_timm(
    state_dict: Mapping[str, torch.Tensor], no_embed_class: bool | None = None
) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` layout to ours.

    ``no_embed_class`` says whether timm's ``pos_embed`` covers only the patches (DINOv2 and
    DeiT-III models); when None it is read from the shapes, assuming a square patch grid.
    """
    sd = {k: v for k, v in state_dict.items() if not _HEAD_KEYS.match(k)}
    cls, pos = sd.pop("cls_token"), sd.pop("pos_embed")
    reg = sd.pop("reg_token", None)
    num_prefix = 1 + (reg.shape[1] if reg is not None else 0)
    if no_embed_class is None:
        no_embed_class = _is_square(pos.shape[1]) and not _is_square(pos.shape[1] - num_prefix)
    if not no_embed_class:
        cls = cls + pos[:, :1]
        if reg is not None:
            reg = reg + pos[:, 1:num_prefix]
        pos = pos[:, num_prefix:]
    out = {"cls_token": cls, "pos_embed": torch.cat([torch.zeros_like(cls), pos], dim=1)}
    if reg is not None:
        out["register_tokens"] = reg
    out.update(sd)
    return out


def to_timm(
    state_dict: Mapping[str, torch.Tensor], no_embed_class: bool = True, pre_norm: bool = False
) -> dict[str, torch.Tensor]:
    """Our layout to timm's; ``no_embed_class`` and ``pre_norm`` as the target timm model was
    built. timm ties the patch-embedding bias to ``pre_norm`` (none with it, one without): a
    bias the target lacks is folded into the patches' position embedding (the same constant
    added to every patch token), a bias it needs and we lack is zero."""
    sd = dict(state_dict)
    sd.pop("mask_token", None)
    cls, pos = sd.pop("cls_token"), sd.pop("pos_embed")
    reg = sd.pop("register_tokens", None)
    bias = sd.pop("patch_embed.proj.bias", None)
    if pre_norm and bias is not None:
        pos = torch.cat([pos[:, :1], pos[:, 1:] + bias], dim=1)
    elif not pre_norm:
        weight = sd["patch_embed.proj.weight"]
        sd["patch_embed.proj.bias"] = bias if bias is not None else weight.new_zeros(len(weight))
    out = {}
    if no_embed_class:
        out["cls_token"] = cls + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    else:
        out["cls_token"] = cls
        num_reg = reg.shape[1] if reg is not None else 0
        reg_pos = pos.new_zeros(1, num_reg, pos.shape[-1])
        out["pos_embed"] = torch.cat([pos[:, :1], reg_pos, pos[:, 1:]], dim=1)
    if reg is not None:
        out["reg_token"] = reg
    out.update(sd)
    return out


_OPEN_CLIP_RENAMES = [
    (r"^transformer\.resblocks\.", "blocks."),
    (r"\.ln_1\.", ".norm1."),
    (r"\.ln_2\.", ".norm2."),
    (r"\.attn\.in_proj_weight$", ".attn.qkv.weight"),
    (r"\.attn\.in_proj_bias$", ".attn.qkv.bias"),
    (r"\.attn\.out_proj\.", ".attn.proj."),
    (r"\.ls_1\.", ".ls1."),
    (r"\.ls_2\.", ".ls2."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
    (r"^ln_pre\.", "norm_pre."),
    (r"^ln_post\.", "norm."),
    (r"^conv1\.", "patch_embed.proj."),
]


def from_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP visual tower (``visual.*`` of a CLIP checkpoint, or the tower alone) to ours.

    The projection ``proj`` to the joint space belongs to the CLIP head and is left out; build
    the RegisterViT with ``pre_norm=True, norm_eps=1e-5, num_registers=0, patch_bias=False``
    to match (a model with a patch bias loads it as zero).
    """
    if any(k.startswith("visual.") for k in state_dict):
        state_dict = {k[7:]: v for k, v in state_dict.items() if k.startswith("visual.")}
    out = {}
    for k, v in state_dict.items():
        if _HEAD_KEYS.match(k):
            continue
        if k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        else:
            for pattern, repl in _OPEN_CLIP_RENAMES:
                k = re.sub(pattern, repl, k)
            out[k] = v
    return out


_CONVERTERS = {
    "ours": dict,
    "dinov2": from_dinov2,
    "timm": from_timm,
    "open_clip": from_open_clip,
}


def resample_pos_embed(
    pos_embed: torch.Tensor, grid: tuple[int, int], antialias: bool = True
) -> torch.Tensor:
    """Bicubically resample a square ``(1, 1 + n, D)`` [CLS]+patch embedding to ``grid``."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side != pos_embed.shape[1] - 1:
        raise ValueError(f"pos_embed of {pos_embed.shape[1] - 1} patches is not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    patch = resample_patch_pos_embed(pos_embed[:, 1:], (side, side), grid, antialias)
    return torch.cat([pos_embed[:, :1], patch], dim=1)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], layout: str = "ours"
) -> dict[str, torch.Tensor]:
    """A state dict in ``layout`` (one of LAYOUTS) in our layout."""
    if layout not in _CONVERTERS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return _CONVERTERS[layout](state_dict)


def load_pretrained(
    model: RegisterViT,
    state_dict: Mapping[str, torch.Tensor],
    layout: str = "ours",
    strict: bool = True,
) -> tuple[list[str], list[str]]:
    """Load a state dict in ``layout`` into ``model``; returns (missing, unexpected) keys.

    A position embedding trained at another resolution is resampled to the model's grid. With
    ``strict`` any missing or unexpected key (or a shape mismatch) raises
    ``CheckpointMismatchError`` naming them all; the mask token may be absent (inference-only
    checkpoints drop it) and keeps its initial value. A patch embedding without bias loads into
    a model with one as a zero bias, and a zero bias into a model without one (both exact).
    """
    sd = convert_state_dict(state_dict, layout)
    own = model.state_dict()
    _match_patch_bias(sd, "patch_embed.proj.bias" in own)
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd["pos_embed"] = resample_pos_embed(
            sd["pos_embed"], model.grid_size, model.config.interpolate_antialias
        )
    missing = sorted(k for k in own if k not in sd and k != "mask_token")
    unexpected = sorted(k for k in sd if k not in own)
    mismatched = sorted(k for k in own if k in sd and sd[k].shape != own[k].shape)
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
    if strict and (missing or unexpected or shapes):
        raise CheckpointMismatchError(missing, unexpected, shapes)
    loadable = {k: v for k, v in sd.items() if k in own and k not in mismatched}
    model.load_state_dict(loadable, strict=False)
    return missing, unexpected


def _match_patch_bias(sd: dict[str, torch.Tensor], model_has_bias: bool) -> None:
    bias, weight = sd.get("patch_embed.proj.bias"), sd.get("patch_embed.proj.weight")
    if model_has_bias and bias is None and weight is not None:
        sd["patch_embed.proj.bias"] = weight.new_zeros(len(weight))
    elif not model_has_bias and bias is not None and not bias.any():
        del sd["patch_embed.proj.bias"]


def timm_config(model: RegisterViT, no_embed_class: bool | None = None) -> dict:
    """The timm ``VisionTransformer`` that computes what ``model`` computes, as plain values:
    its constructor arguments (``build_timm_vit`` turns ``norm_eps`` and ``ffn`` into layers).

    ``no_embed_class`` (whether timm's position embedding covers only the patches) defaults to
    True with registers (as timm's DINOv2 models) and False without (as timm's classic ViTs).
    """
    config = model.config
    if no_embed_class is None:
        no_embed_class = config.num_registers > 0
    if config.ffn == "swiglu":
        mlp_ratio = model.blocks[0].mlp.fc1.out_features / config.embed_dim
    else:
        mlp_ratio = config.mlp_ratio
    return dict(
        img_size=list(config.img_size),
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=0,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=config.qkv_bias,
        init_values=config.layerscale_init,
        class_token=True,
        reg_tokens=config.num_registers,
        no_embed_class=no_embed_class,
        pre_norm=config.pre_norm,
        global_pool="token",
        dynamic_img_size=True,
        norm_eps=config.norm_eps,
        ffn=config.ffn,
    )


def build_timm_vit(config: Mapping) -> nn.Module:
    """A timm ``VisionTransformer`` (random weights) from a ``timm_config`` dict, such as the
    ``timm`` entry of a backbone exported with ``--layout timm``."""
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(config)
    kwargs["norm_layer"] = partial(nn.LayerNorm, eps=kwargs.pop("norm_eps"))
    if kwargs.pop("ffn") == "swiglu":
        kwargs.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return VisionTransformer(**kwargs)


def timm_state_dict(model: RegisterViT, config: Mapping) -> dict[str, torch.Tensor]:
    """``model``'s weights for the timm model that ``build_timm_vit(config)`` builds."""
    return to_timm(model.state_dict(), config["no_embed_class"], config["pre_norm"])


def create_timm_model(model: RegisterViT, no_embed_class: bool | None = None) -> nn.Module:
    """A timm ``VisionTransformer`` with the same configuration and weights (strict load); the
    head is left out (``num_classes=0``). ``no_embed_class`` as in ``timm_config``."""
    config = timm_config(model, no_embed_class)
    timm_model = build_timm_vit(config)
    timm_model.load_state_dict(timm_state_dict(model, config), strict=True)
    return timm_model

"""Any checkpoint as a RegisterViT for analysis: our training checkpoints (single file or
sharded), our exported backbones, and released DINOv2-hub, timm and OpenCLIP weights, as files
or by name from the local caches (see ``released``), whose architecture is read from the tensor
shapes and, for names, from what the weights' library states."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..models import ARCHS, LAYOUTS, RegisterViT, convert_state_dict, load_pretrained
from ..models.convert import from_timm, unwrap_state_dict
from ..models.vit import swiglu_hidden_features
from ..objectives.checkpoint import exported_backbone, load_objective
from ..objectives.safe_load import read_checkpoint
from .released import is_released_name, resolve

HEAD_DIM = 64  # every released ViT we know of (DINOv2, DeiT-III, OpenCLIP) uses 64


@dataclass
class LoadedBackbone:
    """A backbone ready for analysis with the input normalization it was trained with."""

    model: RegisterViT
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def checkpoint_name(path: str | Path) -> str:
    """A short name for reports: ``<experiment>/version_N/<stem>`` inside a run directory,
    else the file or directory name without its suffix."""
    path = Path(path)
    parts = path.resolve().parts
    if "checkpoints" in parts[:-1]:
        i = len(parts) - 1 - parts[::-1].index("checkpoints")
        if i >= 2:
            return f"{parts[i - 2]}/{parts[i - 1]}/{path.stem}"
    return path.stem


def read_state_file(path: Path, trusted: bool = False) -> dict:
    """A ``.safetensors`` file or anything ``torch.load`` reads, on the CPU; only a ``trusted``
    file may run code while it loads (see ``read_checkpoint``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return read_checkpoint(path, trusted)


def infer_config(state_dict: dict[str, torch.Tensor], layout: str) -> dict:
    """RegisterViT arguments from a state dict in our layout (converted from ``layout``).

    Heads are ``embed_dim / 64``; DINOv2-hub models interpolate position embeddings as the hub
    builds them (no anti-aliasing and offset 0.1 without registers)."""
    try:
        cls, pos = state_dict["cls_token"], state_dict["pos_embed"]
        patch = state_dict["patch_embed.proj.weight"]
        fc1 = state_dict["blocks.0.mlp.fc1.weight"]
        fc2 = state_dict["blocks.0.mlp.fc2.weight"]
    except KeyError as exn:
        raise ValueError(
            f"not a {layout} ViT state dict: no {exn.args[0]} after conversion "
            f"(first keys: {', '.join(list(state_dict)[:5])})"
        ) from None
    embed_dim = cls.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise ValueError(f"pos_embed of {pos.shape[1] - 1} patches is not a square grid")
    registers = state_dict.get("register_tokens")
    num_registers = 0 if registers is None else registers.shape[1]
    hidden = fc2.shape[1]
    if fc1.shape[0] == 2 * hidden:
        ffn = "swiglu"
        mlp_ratio = next(
            (
                r
                for r in (4.0, 1.5 * hidden / embed_dim)
                if swiglu_hidden_features(embed_dim, r) == hidden
            ),
            None,
        )
        if mlp_ratio is None:
            raise ValueError(f"SwiGLU hidden width {hidden} cannot be built for width {embed_dim}")
    else:
        ffn, mlp_ratio = "mlp", hidden / embed_dim
    arch = next(
        (a for a, s in ARCHS.items() if s["embed_dim"] == embed_dim and s["depth"] == depth),
        "vit_base",
    )
    hub_interpolation = layout == "dinov2" and num_registers == 0
    return dict(
        arch=arch,
        img_size=side * patch.shape[-1],
        patch_size=patch.shape[-1],
        in_chans=patch.shape[1],
        num_registers=num_registers,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(1, embed_dim // HEAD_DIM),
        ffn=ffn,
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        layerscale_init=1e-5 if "blocks.0.ls1.gamma" in state_dict else None,
        pre_norm="norm_pre.weight" in state_dict,
        norm_eps=1e-5 if layout == "open_clip" else 1e-6,
        interpolate_antialias=not hub_interpolation,
        interpolate_offset=0.1 if hub_interpolation else 0.0,
    )


def _strip_backbone_prefix(state_dict: dict) -> dict:
    # DINOv2 training checkpoints keep the backbone under "teacher" -> "backbone.".
    if state_dict and all(k.startswith("backbone.") for k in state_dict):
        return {k[9:]: v for k, v in state_dict.items()}
    return state_dict


def load_backbone(
    path: str | Path,
    format: str = "ours",
    part: str | None = None,
    num_heads: int | None = None,
    trusted: bool = False,
) -> LoadedBackbone:
    """The backbone stored at ``path`` in eval mode on the CPU.

    Args:
        path: ``ours``: a training checkpoint (``.ckpt`` or a sharded directory) or a file from
            ``lightning-registers export``; other formats: a state dict file (``.pth``,
            ``.pt``, ``.bin``, ``.safetensors``). Or a released model by name from the local
            caches: ``timm:NAME``, ``hf-hub:REPO``, ``dinov2:NAME``, ``open_clip:ARCH/TAG``
            (see ``released``); the name sets the format, and only tensors load.
        format: one of ``ours``, ``dinov2``, ``timm``, ``open_clip``.
        part: the backbone of a training checkpoint (DINO: ``teacher``, the default, or
            ``student``).
        num_heads: attention heads of released weights (default: what the library of a named
            model states, else ``embed_dim / 64``).
        trusted: load a file that needs code to unpickle (only one from a source you trust);
            by default only tensors and plain data load, else a one-line error names the file.
    """
    heads = {"num_heads": num_heads} if num_heads else {}
    if is_released_name(path):
        weights = resolve(path)
        model = _released_model(
            read_state_file(weights.path),
            weights.layout,
            weights.path,
            {**weights.config, **heads},
            weights.no_embed_class,
        )
        return LoadedBackbone(model.eval(), path, weights.mean, weights.std)
    if format not in LAYOUTS:
        raise ValueError(f"format must be one of {LAYOUTS}, got {format!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    if format == "ours":
        stored = {} if path.is_dir() or path.suffix == ".ckpt" else read_state_file(path, trusted)
        if not stored or "hyper_parameters" in stored:
            module = load_objective(path, trusted)
            model = exported_backbone(module, part)
            mean, std = module.image_mean, module.image_std
        elif "config" in stored and "state_dict" in stored:
            model = RegisterViT(**stored["config"])
            load_pretrained(model, stored["state_dict"], stored.get("layout", "ours"))
            mean, std = stored.get("mean", mean), stored.get("std", std)
        else:
            raise ValueError(
                f"{path} is neither a training checkpoint nor an exported backbone; "
                f"pass --format for released weights ({', '.join(LAYOUTS[1:])})"
            )
    else:
        if path.is_dir():
            raise ValueError(f"{path} is a directory; {format} weights are one file")
        if format == "open_clip":
            mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        model = _released_model(read_state_file(path, trusted), format, path, heads)
    return LoadedBackbone(model.eval(), checkpoint_name(path), tuple(mean), tuple(std))


def _released_model(
    stored: dict, layout: str, path: Path, config: dict, no_embed_class: bool | None = None
) -> RegisterViT:
    """A RegisterViT holding released weights in ``layout``: the architecture read from the
    shapes, with ``config`` (what the weights' library states) over it."""
    raw = _strip_backbone_prefix(unwrap_state_dict(stored))
    try:
        if layout == "timm":
            converted = from_timm(raw, no_embed_class)
        else:
            converted = convert_state_dict(raw, layout)
    except KeyError as exn:
        raise ValueError(f"not a {layout} ViT state dict: no {exn.args[0]} in {path}") from None
    model = RegisterViT(**{**infer_config(converted, layout), **config})
    load_pretrained(model, converted)
    return model

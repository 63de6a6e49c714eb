"""Objective checkpoints outside training: load a single-file or sharded (FSDP2) checkpoint into
one process, and export its backbone for inference and analysis."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.cli import instantiate_module

from ..models import RegisterViT, to_timm
from .base import ObjectiveModule

SHARDED_METADATA = "meta.pt"
EXPORT_LAYOUTS = ("ours", "timm")


def load_objective(path: str | Path) -> ObjectiveModule:
    """The objective module saved at ``path`` (a ``.ckpt`` file, or the directory FSDP2 writes),
    rebuilt from its hyperparameters on the CPU in this process."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    sharded = path.is_dir()
    meta_path = path / SHARDED_METADATA if sharded else path
    if sharded and not meta_path.is_file():
        raise FileNotFoundError(
            f"{path} is a directory without {SHARDED_METADATA}: not a checkpoint"
        )
    checkpoint = torch.load(meta_path, map_location="cpu", weights_only=False)
    hparams = dict(checkpoint["hyper_parameters"])
    class_path = hparams.get("_class_path")
    if not class_path:
        raise ValueError(f"checkpoint {path} does not name its objective class (_class_path)")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    module = instantiate_module(cls, {k: v for k, v in hparams.items() if not k.startswith("_")})
    if sharded:
        state = {"state_dict": module.state_dict()}
        dcp.load(state, checkpoint_id=path)
        module.load_state_dict(state["state_dict"])
    else:
        module.load_state_dict(checkpoint["state_dict"])
    return module.eval()


def exported_backbone(module: ObjectiveModule, part: str | None = None) -> RegisterViT:
    """The backbone to export: ``part`` names one of ``module.monitored_backbones()``; by
    default the teacher where there is one (DINOv2 releases the teacher), else the backbone."""
    backbones = module.monitored_backbones()
    part = part or ("teacher" if "teacher" in backbones else next(iter(backbones)))
    if part not in backbones:
        raise ValueError(f"part must be one of {sorted(backbones)}, got {part!r}")
    return backbones[part]


def export_backbone(
    checkpoint: str | Path, out: str | Path, part: str | None = None, layout: str = "ours"
) -> Path:
    """Write the checkpoint's backbone to ``out`` as ``{"config", "state_dict", "layout",
    "mean", "std"}``; ``RegisterViT(**config)`` rebuilds it (``layout="ours"``), or timm's
    VisionTransformer loads the state dict (``layout="timm"``); images are normalized with
    ``mean`` and ``std`` as in training."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout must be one of {EXPORT_LAYOUTS}, got {layout!r}")
    module = load_objective(checkpoint)
    backbone = exported_backbone(module, part)
    state = backbone.state_dict() if layout == "ours" else to_timm(backbone.state_dict())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    exported = {
        "config": dict(backbone.config),
        "state_dict": state,
        "layout": layout,
        "mean": list(module.image_mean),
        "std": list(module.image_std),
    }
    torch.save(exported, out)
    return out

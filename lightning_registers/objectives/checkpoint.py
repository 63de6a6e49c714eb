"""Objective checkpoints outside training: check that one is of a given objective, load a
single-file or sharded (FSDP2) checkpoint into one process, and export its backbone for inference
and analysis."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.cli import instantiate_module

from ..models import RegisterViT, timm_config, timm_state_dict
from .base import ObjectiveModule
from .safe_load import read_checkpoint

EXPORT_LAYOUTS = ("ours", "timm")


def import_objective(class_path: str, source: str | Path) -> type[ObjectiveModule]:
    """The objective class at ``class_path`` (named by ``source``, for errors). Only an
    ObjectiveModule is accepted: a checkpoint names the class it is rebuilt with, and building
    anything else from the checkpoint's arguments could call anything."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"{source} names objective {class_path}, which does not import") from None
    if not (isinstance(cls, type) and issubclass(cls, ObjectiveModule)):
        raise ValueError(f"{source} names {class_path}, which is not an objective")
    return cls


def check_training_checkpoint(checkpoint: Any, path: str | Path, class_path: str) -> None:
    """Raise unless a loaded ``checkpoint`` is a Lightning training checkpoint of the objective
    at ``class_path`` (or of one it derives from or that derives from it), naming both."""
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning training checkpoint")
    saved = checkpoint.get("hyper_parameters", {}).get("_class_path")
    if not saved:
        return
    held = import_objective(saved, f"checkpoint {path}")
    built = import_objective(class_path, "the config")
    if not (issubclass(held, built) or issubclass(built, held)):
        raise ValueError(
            f"checkpoint {path} holds a {held.__name__} but the config builds a "
            f"{built.__name__}: use the config of the run it comes from"
        )


def load_objective(path: str | Path, trusted: bool = False) -> ObjectiveModule:
    """The objective module saved at ``path`` (a ``.ckpt`` file, or the directory FSDP2 writes),
    rebuilt from its hyperparameters on the CPU in this process. Only a ``trusted`` file may
    run code while it loads (see ``read_checkpoint``)."""
    path = Path(path)
    checkpoint = read_checkpoint(path, trusted)
    hparams = checkpoint.get("hyper_parameters", {})
    if not hparams.get("_class_path"):
        raise ValueError(f"checkpoint {path} does not name its objective class (_class_path)")
    cls = import_objective(hparams["_class_path"], f"checkpoint {path}")
    module = instantiate_module(cls, {k: v for k, v in hparams.items() if not k.startswith("_")})
    sharded = path.is_dir()
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
    checkpoint: str | Path,
    out: str | Path,
    part: str | None = None,
    layout: str = "ours",
    trusted: bool = False,
) -> Path:
    """Write the checkpoint's backbone to ``out`` as ``{"config", "state_dict", "layout",
    "mean", "std"}``; ``RegisterViT(**config)`` rebuilds it (``layout="ours"``), or the timm
    VisionTransformer that ``build_timm_vit(exported["timm"])`` builds loads the state dict
    (``layout="timm"``; ``timm`` holds its constructor arguments, ``no_embed_class`` among
    them); images are normalized with ``mean`` and ``std`` as in training. ``trusted``: as in
    ``load_objective``."""
    if layout not in EXPORT_LAYOUTS:
        raise ValueError(f"layout must be one of {EXPORT_LAYOUTS}, got {layout!r}")
    module = load_objective(checkpoint, trusted)
    backbone = exported_backbone(module, part)
    timm = timm_config(backbone) if layout == "timm" else None
    state = backbone.state_dict() if timm is None else timm_state_dict(backbone, timm)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    exported = {
        "config": backbone.config.as_kwargs(),
        "state_dict": state,
        "layout": layout,
        "mean": list(module.image_mean),
        "std": list(module.image_std),
        **({"timm": timm} if timm else {}),
    }
    torch.save(exported, out)
    return out

"""Released models by name, found in the user's local caches: ``timm:NAME``, ``hf-hub:REPO``,
``dinov2:NAME`` and ``open_clip:ARCH/TAG``.

Each library's own tables say where a name's weights live and how its model is built: timm's
pretrained configs and model factory, open_clip's pretrained tags and model configs, and the
DINOv2 hub's names and URLs (facebookresearch/dinov2, ``dinov2/hub/backbones.py``). Weights are
looked up with huggingface_hub's cache lookup in the Hugging Face cache (``HF_HUB_CACHE``, or
``HF_HOME``/hub) and where ``torch.hub.load_state_dict_from_url`` keeps them
(``TORCH_HOME``/hub/checkpoints). Nothing is downloaded, so a cached name needs no network, and
a name that is not cached is a one-line error naming the path looked at and a command that
fills it. The architecture facts (heads, LayerNorm epsilon, activation, where the position
embedding sits) come from the library's model built on the meta device: no memory, no weights.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ..models import ARCHS

SCHEMES = ("timm", "hf-hub", "dinov2", "open_clip")
# The DINOv2 hub's backbones: dinov2_vit{s,b,l,g}14 and their _reg versions (4 registers).
DINOV2_NAME = re.compile(r"dinov2_vit([sblg])14(_reg)?")
DINOV2_ARCHS = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
DINOV2_URL = (
    "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/dinov2_vit{size}14{reg}_pretrain.pth"
)


class NotCachedError(FileNotFoundError):
    """Released weights that are not in the local cache; the message names the path looked at
    and a command that fills it."""


@dataclass(frozen=True)
class ReleasedWeights:
    """A released model's cached weights and what its library states about them.

    Args:
        path: the cached weights file.
        layout: its key layout (``timm``, ``dinov2`` or ``open_clip``).
        mean: input normalization mean the model was trained with.
        std: input normalization standard deviation.
        config: RegisterViT arguments the library states (the rest is read from the shapes).
        no_embed_class: timm only, whether its position embedding covers the patches alone.
    """

    path: Path
    layout: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: dict = field(default_factory=dict)
    no_embed_class: bool | None = None


def is_released_name(value: object) -> bool:
    """Whether ``value`` is a released model's name (``SCHEME:...``) rather than a path."""
    return isinstance(value, str) and value.partition(":")[0] in SCHEMES and ":" in value


def resolve(name: str) -> ReleasedWeights:
    """The cached weights of the released model ``name`` (``timm:NAME``, ``hf-hub:REPO``,
    ``dinov2:NAME`` or ``open_clip:ARCH/TAG``); ``NotCachedError`` when they are not cached,
    ``ValueError`` for an unknown name or an architecture RegisterViT does not implement."""
    scheme, _, identifier = name.partition(":")
    if scheme not in SCHEMES or not identifier:
        raise ValueError(f"{name!r} is not SCHEME:NAME with a scheme of {', '.join(SCHEMES)}")
    resolvers = {"timm": _timm, "hf-hub": _hf_hub, "dinov2": _dinov2, "open_clip": _open_clip}
    return resolvers[scheme](identifier, name)


def _timm(identifier: str, name: str) -> ReleasedWeights:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(identifier)
    except RuntimeError as exn:  # a known architecture with an unknown tag
        raise ValueError(f"{name}: {exn}") from None
    if cfg is None:
        raise ValueError(f"{name}: timm has no pretrained weights of that name")
    return _timm_weights(name, cfg.architecture, cfg.to_dict(), {})


def _hf_hub(identifier: str, name: str) -> ReleasedWeights:
    """A timm repository (``config.json`` naming an ``architecture``) or an open_clip one
    (``open_clip_config.json``), told apart by the configs in the cache."""
    from open_clip.constants import HF_CONFIG_NAME, HF_WEIGHTS_NAME
    from timm.models._hub import _parse_model_cfg

    timm_config = _cached_json(identifier, "config.json")
    if timm_config and "architecture" in timm_config:
        pretrained_cfg, architecture, model_args = _parse_model_cfg(
            timm_config, {"hf_hub_id": identifier, "source": "hf-hub"}
        )
        return _timm_weights(name, architecture, pretrained_cfg, model_args)
    clip_config = _cached_json(identifier, HF_CONFIG_NAME)
    if clip_config and "model_cfg" in clip_config:
        model_cfg = clip_config["model_cfg"]
        return _open_clip_weights(
            name,
            identifier,
            HF_WEIGHTS_NAME,
            model_cfg,
            clip_config.get("preprocess_cfg", {}),
            model_cfg.get("quick_gelu", False),
        )
    folder = _hf_repo_folder(identifier)
    raise NotCachedError(
        f"{name} is not in the Hugging Face cache (HF_HUB_CACHE): no timm config.json nor "
        f"{HF_CONFIG_NAME} under {folder}; fill it with: hf download {identifier}"
    )


def _dinov2(identifier: str, name: str) -> ReleasedWeights:
    match = DINOV2_NAME.fullmatch(identifier)
    if match is None:
        raise ValueError(
            f"{name}: the DINOv2 hub's backbones are dinov2_vit{{s,b,l,g}}14 and "
            "dinov2_vit{s,b,l,g}14_reg"
        )
    size, registers = match[1], match[2] is not None
    arch = DINOV2_ARCHS[size]
    url = DINOV2_URL.format(size=size, reg="_reg4" if registers else "")
    # The hub builds registered models with anti-aliased interpolation and the others with
    # its 0.1 offset; DINOv2's transforms normalize with ImageNet's mean and std.
    config = dict(
        arch=arch,
        num_heads=ARCHS[arch]["num_heads"],
        num_registers=4 if registers else 0,
        layerscale_init=1.0,
        interpolate_antialias=registers,
        interpolate_offset=0.0 if registers else 0.1,
    )
    path = _torch_hub_cached(name, url)
    return ReleasedWeights(path, "dinov2", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, config)


def _open_clip(identifier: str, name: str) -> ReleasedWeights:
    import open_clip

    arch, _, tag = identifier.rpartition("/")
    if not arch:
        raise ValueError(f"{name}: give ARCH/TAG, e.g. open_clip:ViT-B-16/laion2b_s34b_b88k")
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not tag_cfg.get("hf_hub"):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
        raise ValueError(f"{name}: open_clip has no pretrained tag {tag!r} for {arch!r} ({tags})")
    # open_clip's hf_hub entries are 'org/repo/' (default file) or 'org/repo/file'.
    repo, filename = os.path.split(tag_cfg["hf_hub"])
    model_cfg = open_clip.get_model_config(arch)
    quick_gelu = model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False)
    return _open_clip_weights(name, repo, filename, model_cfg, tag_cfg, quick_gelu)


def _timm_weights(
    name: str, architecture: str, pretrained_cfg: dict, model_args: dict
) -> ReleasedWeights:
    """Where timm loads ``pretrained_cfg``'s weights from (the Hugging Face Hub when it names a
    repository, else a URL through torch hub), looked up in the cache."""
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

    config, no_embed_class = _timm_architecture(name, architecture, model_args)
    source, location = _resolve_pretrained_source(pretrained_cfg)
    if source == "hf-hub":
        repo, filename = location if isinstance(location, tuple) else (location, HF_WEIGHTS_NAME)
        path = _hf_cached(name, repo, [*_get_safe_alternatives(filename), filename])
    elif source == "url":
        path = _torch_hub_cached(name, location)
    else:
        raise ValueError(f"{name}: timm names no download location for its weights")
    mean, std = tuple(pretrained_cfg["mean"]), tuple(pretrained_cfg["std"])
    return ReleasedWeights(path, "timm", mean, std, config, no_embed_class)


def _timm_architecture(name: str, architecture: str, model_args: dict) -> tuple[dict, bool]:
    import timm
    from timm.models.vision_transformer import Block, VisionTransformer

    with torch.device("meta"):
        model = timm.create_model(architecture, pretrained=False, **model_args)
    if not isinstance(model, VisionTransformer) or model.cls_token is None:
        raise ValueError(
            f"{name}: timm builds {architecture} as a {type(model).__name__} without a [CLS] "
            "token; only timm VisionTransformers with one load into RegisterViT"
        )
    block = model.blocks[0]
    if type(block) is not Block:
        raise ValueError(f"{name}: timm's {type(block).__name__} blocks are not RegisterViT's")
    _check_feed_forward(name, block.mlp, block.mlp.act)
    config = dict(num_heads=block.attn.num_heads, norm_eps=block.norm1.eps)
    return config, model.no_embed_class


def _open_clip_weights(
    name: str, repo: str, filename: str, model_cfg: dict, preprocess: dict, quick_gelu: bool
) -> ReleasedWeights:
    """open_clip's weights file of ``repo`` (``filename`` or its default, a safetensors
    alternative first, as ``download_pretrained_from_hf`` picks them) and the normalization of
    ``preprocess`` over open_clip's defaults."""
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.pretrained import _get_safe_alternatives
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    config = _open_clip_architecture(name, model_cfg, quick_gelu)
    filename = filename or HF_WEIGHTS_NAME
    path = _hf_cached(name, repo, [*_get_safe_alternatives(filename), filename])
    merged = merge_preprocess_dict(asdict(PreprocessCfg()), preprocess)
    return ReleasedWeights(path, "open_clip", tuple(merged["mean"]), tuple(merged["std"]), config)


def _open_clip_architecture(name: str, model_cfg: dict, quick_gelu: bool) -> dict:
    from open_clip.model import _build_vision_tower
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    with torch.device("meta"):
        visual = _build_vision_tower(
            model_cfg["embed_dim"], dict(model_cfg["vision_cfg"]), quick_gelu
        )
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"{name}: open_clip's {type(visual).__name__} tower is not a plain ViT")
    if visual.attn_pool is not None or visual.final_ln_after_pool:
        raise ValueError(f"{name}: its tower pools before the final LayerNorm, unlike RegisterViT")
    block = visual.transformer.resblocks[0]
    if type(block) is not ResidualAttentionBlock:
        raise ValueError(f"{name}: open_clip's {type(block).__name__} blocks are not RegisterViT's")
    _check_feed_forward(name, block.mlp, block.mlp.gelu)
    return dict(
        num_heads=block.attn.num_heads,
        norm_eps=visual.ln_post.eps,
        pre_norm=not isinstance(visual.ln_pre, nn.Identity),
    )


def _check_feed_forward(name: str, mlp: nn.Module, act: nn.Module) -> None:
    """RegisterViT's feed-forward is an exact-GELU MLP or a SiLU-gated one (SwiGLU): another
    activation would load without error and compute something else."""
    from timm.layers import GluMlp

    gated = isinstance(mlp, GluMlp) and not mlp.gate_last
    if isinstance(act, nn.SiLU) if gated else (type(act) is nn.GELU and act.approximate == "none"):
        return
    kind = "gated " if gated else ""
    raise ValueError(
        f"{name} uses {type(act).__name__} in its {kind}MLP; RegisterViT implements exact GELU "
        "and SwiGLU only"
    )


def _hf_repo_folder(repo: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(
        repo_id=repo.partition("@")[0], repo_type="model"
    )


def _hf_lookup(repo: str, filename: str) -> Path | None:
    """``repo``'s (``org/name``, optionally ``@revision``) ``filename`` in the cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
    return Path(found) if isinstance(found, str) else None


def _cached_json(repo: str, filename: str) -> dict | None:
    path = _hf_lookup(repo, filename)
    return json.loads(path.read_text()) if path else None


def _hf_cached(name: str, repo: str, filenames: Iterable[str]) -> Path:
    filenames = list(filenames)
    for filename in filenames:
        if found := _hf_lookup(repo, filename):
            return found
    repo_id, _, revision = repo.partition("@")
    fill = f"hf download {repo_id} {filenames[0]}" + (f" --revision {revision}" if revision else "")
    wanted = " or ".join(filenames)
    raise NotCachedError(
        f"{name} is not in the Hugging Face cache (HF_HUB_CACHE): no {wanted} under "
        f"{_hf_repo_folder(repo)}; fill it with: {fill}"
    )


def _torch_hub_cached(name: str, url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url(url)`` keeps the file."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if path.is_file():
        return path
    raise NotCachedError(
        f"{name} is not in the torch hub cache (TORCH_HOME): no {path}; fill it with: "
        f"curl -L --create-dirs -o {path} {url}"
    )

"""Released models by name (``timm:``, ``hf-hub:``, ``dinov2:``, ``open_clip:``) load offline from
caches laid out as huggingface_hub and torch hub lay them out, into a RegisterViT that computes
what the library's own model computes with the same weights, normalized as the library says; a
name that is not cached fails with one line naming the path looked at."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import timm
import torch
from huggingface_hub import constants
from open_clip.push_to_hf_hub import save_config_for_hf
from safetensors.torch import save_file
from test_loading import randomize
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg
from timm.models._hub import save_for_hf
from timm.models.vision_transformer import checkpoint_filter_fn

from lightning_registers.analysis import load_backbone
from lightning_registers.analysis.released import NotCachedError, resolve
from lightning_registers.cli import main
from lightning_registers.data import write_demo_shards
from lightning_registers.models import RegisterViT

DINOV2_REG = "vit_small_patch14_reg4_dinov2.lvd142m"
CLIP_ARCH, CLIP_TAG = "ViT-B-32", "laion2b_s34b_b79k"


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches under ``tmp_path``, named by the environment,
    offline."""
    hf, torch_home = tmp_path / "huggingface" / "hub", tmp_path / "torch"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, when imported.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return SimpleNamespace(hf=hf, torch_home=torch_home, checkpoints=torch_home / "hub/checkpoints")


def add_to_hf_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """The files of ``folder`` as huggingface_hub stores a download of ``repo_id``: content in
    ``blobs/<etag>``, ``snapshots/<commit>/<file>`` linking to it, ``refs/main`` naming the
    commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        etag = hashlib.sha256(f"{repo_id}/{file.name}".encode()).hexdigest()
        os.link(file, repo / "blobs" / etag)
        (snapshot / file.name).symlink_to(Path("../../blobs") / etag)


def random_timm(name: str, **kwargs) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    randomize(model)
    return model


def timm_upload(model: torch.nn.Module, folder: Path, **model_args) -> Path:
    """What timm writes for the Hub: ``model.safetensors`` and ``config.json``."""
    save_for_hf(model, folder, model_args=model_args or None, safe_serialization=True)
    return folder


def all_tokens(model: RegisterViT, x: torch.Tensor) -> torch.Tensor:
    """[CLS], registers and patches after the final norm, as timm's ``forward_features``."""
    with torch.no_grad():
        out = model.forward_features(x)
    cls, registers = out["x_norm_clstoken"][:, None], out["x_norm_regtokens"]
    return torch.cat([cls, registers, out["x_norm_patchtokens"]], dim=1)


def assert_computes_like_timm(
    model: RegisterViT, reference: torch.nn.Module, height: int, width: int | None = None
) -> None:
    x = torch.randn(1, 3, height, width or height)
    with torch.no_grad():
        expected = reference.forward_features(x)
    torch.testing.assert_close(all_tokens(model, x), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    """An OpenCLIP ViT-B/32 with random weights, and its whole state dict (text tower too) in
    ``weights/open_clip_model.safetensors``, the file open_clip looks for first."""
    torch.manual_seed(0)
    model = open_clip.create_model(CLIP_ARCH).eval()
    model.weights = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    save_file(model.state_dict(), model.weights)
    return model


def clip_upload(clip_model, folder: Path) -> Path:
    folder.mkdir()
    os.link(clip_model.weights, folder / clip_model.weights.name)
    return folder


def assert_computes_like_open_clip(model: RegisterViT, clip: torch.nn.Module) -> None:
    visual = clip.visual
    visual.output_tokens = True
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pooled, tokens = visual(x)
        out = model.forward_features(x)
    torch.testing.assert_close(out["x_norm_patchtokens"], tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_clstoken"] @ visual.proj, pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name, kwargs",
    [(DINOV2_REG, dict(img_size=56)), ("vit_tiny_patch16_224.augreg_in21k", {})],
)
def test_timm_names_load_from_the_hugging_face_cache(caches, tmp_path, name, kwargs):
    reference = random_timm(name, **kwargs)
    cfg = get_pretrained_cfg(name)
    add_to_hf_cache(caches.hf, cfg.hf_hub_id, timm_upload(reference, tmp_path / "upload"))
    loaded = load_backbone(f"timm:{name}")
    assert loaded.name == f"timm:{name}"
    assert (loaded.mean, loaded.std) == (cfg.mean, cfg.std)  # augreg: 0.5, dinov2: ImageNet's
    assert loaded.model.num_heads == reference.blocks[0].attn.num_heads
    assert loaded.model.num_registers == reference.num_reg_tokens
    assert_computes_like_timm(loaded.model, reference, kwargs.get("img_size", 224))


def test_hf_hub_timm_repositories_load_with_their_config(caches, tmp_path):
    reference = random_timm(DINOV2_REG, img_size=56)
    reference.pretrained_cfg = {**reference.pretrained_cfg, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    add_to_hf_cache(
        caches.hf, "someone/vits14-reg", timm_upload(reference, tmp_path / "up", img_size=56)
    )
    loaded = load_backbone("hf-hub:someone/vits14-reg")
    assert (loaded.mean, loaded.std) == ((0.5,) * 3, (0.25,) * 3)
    assert resolve("hf-hub:someone/vits14-reg").no_embed_class is True
    assert_computes_like_timm(loaded.model, reference, 56)


def test_hf_hub_open_clip_repositories_load_with_their_config(caches, tmp_path, clip_model):
    folder = clip_upload(clip_model, tmp_path / "upload")
    normalized = SimpleNamespace(
        visual=SimpleNamespace(image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    )
    model_cfg = open_clip.get_model_config(CLIP_ARCH)
    save_config_for_hf(normalized, folder / "open_clip_config.json", model_cfg)
    add_to_hf_cache(caches.hf, "someone/clip-b32", folder)
    loaded = load_backbone("hf-hub:someone/clip-b32")
    assert (loaded.mean, loaded.std) == ((0.5,) * 3, (0.25,) * 3)
    assert loaded.model.config.pre_norm and loaded.model.config.norm_eps == 1e-5
    assert_computes_like_open_clip(loaded.model, clip_model)


def test_open_clip_tags_load_from_the_hugging_face_cache(caches, tmp_path, clip_model):
    tag_cfg = open_clip.get_pretrained_cfg(CLIP_ARCH, CLIP_TAG)
    repo = tag_cfg["hf_hub"].rstrip("/")
    add_to_hf_cache(caches.hf, repo, clip_upload(clip_model, tmp_path / "upload"))
    loaded = load_backbone(f"open_clip:{CLIP_ARCH}/{CLIP_TAG}", format="timm")  # name wins
    assert (loaded.mean, loaded.std) == (tag_cfg["mean"], tag_cfg["std"])
    assert loaded.model.num_heads == clip_model.visual.transformer.resblocks[0].attn.num_heads
    assert_computes_like_open_clip(loaded.model, clip_model)


def test_dinov2_hub_names_load_from_the_torch_hub_cache(caches):
    # The hub's key layout (mask_token, pos_embed over [CLS] and patches, register_tokens).
    source = RegisterViT("vit_small", img_size=518, patch_size=14, layerscale_init=1.0)
    randomize(source)
    caches.checkpoints.mkdir(parents=True)
    torch.save(source.state_dict(), caches.checkpoints / "dinov2_vits14_reg4_pretrain.pth")
    # timm's own DINOv2 model, given the hub file through timm's own conversion.
    arch = DINOV2_REG.split(".")[0]
    reference = timm.create_model(arch, pretrained=False, dynamic_img_size=True).eval()
    reference.load_state_dict(checkpoint_filter_fn(source.state_dict(), reference))
    loaded = load_backbone("dinov2:dinov2_vits14_reg")
    assert (loaded.mean, loaded.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    config = loaded.model.config
    assert (config.num_registers, config.interpolate_antialias, config.interpolate_offset) == (
        4,
        True,
        0.0,
    )
    # At another size than the 518 trained at: the hub interpolates the position embeddings of
    # its registered models as timm does (bicubic, anti-aliased, no offset).
    assert_computes_like_timm(loaded.model, reference, 70, 84)


@pytest.mark.parametrize(
    "name, looked_at",
    [
        (f"timm:{DINOV2_REG}", f"huggingface/hub/models--timm--{DINOV2_REG}"),
        ("hf-hub:someone/vits14-reg", "huggingface/hub/models--someone--vits14-reg"),
        ("dinov2:dinov2_vits14_reg", "torch/hub/checkpoints/dinov2_vits14_reg4_pretrain.pth"),
        (
            f"open_clip:{CLIP_ARCH}/{CLIP_TAG}",
            "huggingface/hub/models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K",
        ),
    ],
)
def test_a_name_not_in_the_cache_fails_in_one_line_naming_the_path(
    caches, tmp_path, name, looked_at
):
    with pytest.raises(NotCachedError) as error:
        load_backbone(name)
    message = str(error.value)
    assert str(tmp_path / looked_at) in message and "fill it with: " in message
    assert "\n" not in message


def test_names_of_architectures_registervit_lacks_are_refused_before_any_lookup(caches):
    with pytest.raises(ValueError, match="QuickGELU"):
        resolve("open_clip:ViT-B-32/openai")
    with pytest.raises(ValueError, match="without a \\[CLS\\] token"):
        resolve("timm:vit_huge_patch14_gap_224.in1k_ijepa")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        resolve("open_clip:ViT-B-32/nope")
    with pytest.raises(ValueError, match="dinov2_vit"):
        resolve("dinov2:dinov2_vitl14_lc")


def test_analyze_runs_offline_on_a_timm_name_from_the_environments_cache(caches, tmp_path, capsys):
    reference = random_timm(DINOV2_REG, img_size=56)
    repo = get_pretrained_cfg(DINOV2_REG).hf_hub_id
    add_to_hf_cache(caches.hf, repo, timm_upload(reference, tmp_path / "up"))
    write_demo_shards(tmp_path / "shards", train=0, val=8, size=64, seed=0, progress=False)
    command = ["analyze", "--images", str(tmp_path / "shards/val/*.tar"), "--quiet"]
    # A fresh process finds the cache through the environment alone.
    done = subprocess.run(
        [sys.executable, "-m", "lightning_registers.cli", *command, "--out", str(tmp_path / "out")]
        + ["--checkpoint", f"timm:{DINOV2_REG}", "--num-images", "8"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    model = summary["models"][f"timm:{DINOV2_REG}"]
    assert model["checkpoint"] == f"timm:{DINOV2_REG}"
    assert (model["backbone"]["num_registers"], model["backbone"]["num_heads"]) == (4, 6)
    assert model["images"] == {"count": 8, "image_size": 56}

    # A name that is not cached stops analyze before any image is read, in one line.
    with pytest.raises(SystemExit):
        main([*command, "--out", str(tmp_path / "none"), "--checkpoint", "dinov2:dinov2_vitb14"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "dinov2_vitb14_pretrain.pth" in error and "torch hub cache" in error
    assert not (tmp_path / "none").exists()

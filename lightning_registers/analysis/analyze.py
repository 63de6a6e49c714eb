"""All measurements on one or several checkpoints, with figures side by side and a summary:
what ``lightning-registers analyze`` runs."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..measures.norms import OUTPUT, RULES, OutlierRule
from .attention import (
    attention_maps,
    attention_on_high_norm,
    plot_attention,
    plot_attention_side_by_side,
)
from .images import ImageSet, load_images
from .loading import LoadedBackbone
from .lost import lost, plot_lost
from .neighbours import neighbour_similarity, plot_neighbour_similarity
from .norms import (
    first_high_norm_layer,
    layer_statistics,
    plot_layer_statistics,
    plot_norm_distributions,
)
from .probes import pixel_probe, plot_probes, position_probe, token_classification
from .report import write_summary
from .settings import REFERENCE_LOST_K, AnalysisSettings
from .test_time_registers import add_test_time_register, find_register_neurons, model_family
from .tokens import device_of, output_tokens, patch_norms_by_layer

STAGES = 6  # norms, neighbours, probes, attention, LOST, test-time registers
TTR_SUFFIX = " + test-time register"
TTR_NEURONS = 10  # register neurons moved, where neither settings nor a model family say


def _norm_summary(norms: dict[str, torch.Tensor], settings: AnalysisSettings) -> dict:
    stats = layer_statistics(norms, settings.threshold, settings.factor)
    return {
        "layers": stats,
        "output": stats[OUTPUT],
        "first_high_norm_block": {
            kind: first_high_norm_layer(stats, OutlierRule(kind).share_key) for kind in RULES
        },
    }


def run_lost(backbone: nn.Module, images: ImageSet, settings: AnalysisSettings) -> dict:
    """LOST on ``images`` as the settings' protocol says (input, ties, ``k``, CorLoc's
    denominator and IoU, ``no_hard``); ``drawn_boxes``: the boxes in pixels of the square
    images."""
    padded = settings.choice("lost_input") == "padded"
    truth = images.original_boxes if padded else images.boxes
    if settings.no_hard:
        truth = [boxes[~hard] for boxes, hard in zip(truth, images.hard, strict=True)]
    k = settings.lost_k or (REFERENCE_LOST_K if settings.reference else None)
    result = lost(
        backbone,
        images.full_resolution() if padded else images.images,
        truth,
        settings.lost_features,
        k,
        settings.gram_bias,
        settings.batch_size,
        ties=settings.choice("lost_ties"),
        corloc_over="boxed" if settings.no_hard else settings.choice("corloc_over"),
        iou_eps=settings.iou_eps,
    )
    result["k"] = k
    result["drawn_boxes"] = images.to_square(result["boxes"]) if padded else result["boxes"]
    return result


def register_neuron_search(
    backbone: nn.Module, settings: AnalysisSettings, first_high_norm_block: str | None = None
) -> dict:
    """How register neurons are found in ``backbone`` under the settings' protocol:
    ``find_register_neurons`` arguments (``rule``, ``layer``, ``top_layer``, ``top_k``,
    ``tokens``, ``average``, ``sparsity``), the value rule ``values`` and the reference's
    model ``family`` (None where not known). Without a family the reference protocol flags
    tokens above ``factor`` x the median token norm and caps the layers at
    ``first_high_norm_block`` (where high-norm patches first appear)."""
    family = model_family(backbone.config) if settings.reference else None
    depth = backbone.depth
    layer = settings.ttr_layer
    if layer is None:
        layer = family.layer if family else -1
    if settings.ttr_threshold is not None:
        rule = OutlierRule("absolute", settings.ttr_threshold)
    elif not settings.reference:
        rule = settings.outlier_rule
    elif family:
        rule = OutlierRule("absolute", family.threshold)
    else:
        rule = OutlierRule("relative", factor=settings.factor)
    top_layer = settings.ttr_top_layer
    if top_layer is None and family:
        top_layer = family.top_layer
    elif top_layer is None and settings.reference and first_high_norm_block:
        top_layer = int(first_high_norm_block.removeprefix("block"))
    elif top_layer is None:
        top_layer = layer
    return {
        "family": family.name if family else None,
        "rule": rule,
        "layer": layer % depth,
        "top_layer": top_layer % depth,
        "top_k": settings.ttr_neurons or (family.top_k if family else TTR_NEURONS),
        "tokens": settings.choice("ttr_tokens"),
        "average": settings.choice("ttr_average"),
        "sparsity": settings.choice("ttr_sparsity"),
        "values": settings.choice("ttr_values"),
    }


def analyze_backbone(
    backbone: nn.Module, images: ImageSet, settings: AnalysisSettings, progress=None
) -> dict:
    """Every measurement of one backbone: a dict of results (tensors for the figures and the
    scalars of ``summary.json``)."""

    def stage(name: str, measure):
        if progress is not None:
            progress.set_postfix_str(name)
        out = measure()
        if progress is not None:
            progress.update()
        return out

    x, bs = images.images, settings.batch_size
    device = device_of(backbone)
    norms = stage("norms", lambda: patch_norms_by_layer(backbone, x, bs))
    high = settings.outlier_rule.mask(norms[OUTPUT])
    result = {"norms": norms, "high_norm": high, "norm_summary": _norm_summary(norms, settings)}
    result["neighbours"] = stage("neighbours", lambda: neighbour_similarity(backbone, x, high, bs))
    cls, patches = output_tokens(backbone, x, bs)
    grid = backbone.patch_grid(x)
    result["probes"] = stage(
        "probes",
        lambda: {
            "position": position_probe(patches, grid, high, device=device),
            "pixels": pixel_probe(patches, x, backbone.patch_size, high, device=device),
            "classification": token_classification(cls, patches, high, images.labels, device),
        },
    )
    result["attention"] = stage("attention", lambda: attention_maps(backbone, x, bs))
    result["attention_on_high_norm"] = attention_on_high_norm(
        result["attention"]["attention"], high
    )
    result["lost"] = stage("LOST", lambda: run_lost(backbone, images, settings))
    search = register_neuron_search(
        backbone, settings, result["norm_summary"]["first_high_norm_block"]["relative"]
    )
    result["ttr_search"] = search
    result["ttr"] = stage(
        "test-time registers",
        lambda: test_time_register_effect(backbone, images, settings, patches, high, search),
    )
    return result


def test_time_register_effect(
    backbone: nn.Module,
    images: ImageSet,
    settings: AnalysisSettings,
    patches: torch.Tensor,
    high_norm: torch.Tensor,
    search: dict | None = None,
) -> dict | None:
    """Find the register neurons (as ``search`` says, default ``register_neuron_search``), add
    a test-time register, and measure the norms, attention maps and LOST again;
    ``normal_token_cosine``: mean cosine similarity of each normal output patch token before
    and after. None when no token is an outlier."""
    x, bs = images.images, settings.batch_size
    search = search or register_neuron_search(backbone, settings)
    neurons = find_register_neurons(
        backbone,
        x,
        search["top_k"],
        search["rule"],
        search["layer"],
        bs,
        tokens=search["tokens"],
        top_layer=search["top_layer"],
        average=search["average"],
        sparsity=search["sparsity"],
    )
    if not neurons:
        return None
    model = add_test_time_register(backbone, neurons, search["values"])
    norms = patch_norms_by_layer(model, x, bs)
    _, after = output_tokens(model, x, bs)
    cosine = F.cosine_similarity(after, patches, dim=-1)
    attention = attention_maps(model, x, bs)
    return {
        "neurons": neurons,
        "norms": norms,
        "norm_summary": _norm_summary(norms, settings),
        "attention": attention,
        "attention_on_high_norm": attention_on_high_norm(attention["attention"], high_norm),
        "lost": run_lost(model, images, settings),
        "normal_token_cosine": cosine[~high_norm].mean().item() if (~high_norm).any() else None,
        "high_norm_token_cosine": cosine[high_norm].mean().item() if high_norm.any() else None,
    }


def analyze(
    backbones: list[LoadedBackbone],
    image_source: str | Path,
    out_dir: str | Path,
    settings: AnalysisSettings | None = None,
    num_images: int = 256,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """Analyse each backbone on the images of ``image_source`` and write the figures,
    ``summary.json`` and ``summary.md`` into ``out_dir``; returns the summary."""
    settings = settings or AnalysisSettings()
    out_dir = Path(out_dir)
    names = _unique([b.name for b in backbones])
    keep_originals = settings.choice("lost_input") == "padded"
    image_sets: dict[tuple, ImageSet] = {}
    results, inputs = {}, {}
    bar = tqdm(total=len(backbones) * STAGES, desc="analyze", disable=not progress)
    for name, loaded in zip(names, backbones, strict=True):
        bar.set_description(f"analyze {name}")
        size = image_size or loaded.model.img_size[0]
        key = (size, loaded.mean, loaded.std)
        if key not in image_sets:
            image_sets[key] = load_images(
                image_source, size, loaded.mean, loaded.std, num_images, keep_originals
            )
        inputs[name] = image_sets[key]
        model = loaded.model.to(device).eval()
        results[name] = analyze_backbone(model, inputs[name], settings, bar)
        loaded.model.cpu()
    bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = write_figures(results, inputs, out_dir, settings)
    return write_summary(results, inputs, backbones, names, settings, figures, out_dir)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def write_figures(
    results: dict[str, dict], inputs: dict[str, ImageSet], out_dir: Path, settings: AnalysisSettings
) -> list[Path]:
    """Every figure, models side by side."""
    rule = settings.outlier_rule
    with_ttr = {n: r["ttr"] for n, r in results.items() if r["ttr"] is not None}
    paths = [
        plot_norm_distributions(
            {n: r["norms"][OUTPUT] for n, r in results.items()},
            rule,
            out_dir / "norm_distribution.png",
            "output patch-token norms",
        ),
        plot_layer_statistics(
            {n: r["norm_summary"]["layers"] for n, r in results.items()},
            rule,
            out_dir / "norms_by_layer.png",
            "patch-token norms by layer",
        ),
        plot_neighbour_similarity(
            {n: r["neighbours"] for n, r in results.items()},
            out_dir / "neighbour_similarity.png",
            rule,
        ),
        plot_probes({n: r["probes"] for n, r in results.items()}, out_dir / "probes.png"),
    ]
    attention = {n: r["attention"] for n, r in results.items()}
    attention.update({n + TTR_SUFFIX: t["attention"] for n, t in with_ttr.items()})
    shown = {}
    for name, maps in attention.items():
        images = inputs[name.removesuffix(TTR_SUFFIX)].images[: settings.attention_images]
        shown[name] = (dict(maps, attention=maps["attention"][: len(images)]), images)
    paths.append(plot_attention_side_by_side(shown, out_dir / "attention.png"))
    for name, (maps, images) in shown.items():
        paths += plot_attention({name: maps}, images, out_dir)
    rows = {}
    for name, result in results.items():
        x = inputs[name]
        rows[name] = (x.images, x.boxes, result["lost"]["drawn_boxes"])
        if name in with_ttr:
            rows[name + TTR_SUFFIX] = (x.images, x.boxes, with_ttr[name]["lost"]["drawn_boxes"])
    paths.append(plot_lost(rows, out_dir / "lost.png"))
    if with_ttr:
        norms = {}
        for name, ttr in with_ttr.items():
            norms[name] = results[name]["norms"][OUTPUT]
            norms[name + TTR_SUFFIX] = ttr["norms"][OUTPUT]
        paths.append(
            plot_norm_distributions(
                norms,
                rule,
                out_dir / "test_time_registers.png",
                "before and after test-time registers",
            )
        )
    return paths

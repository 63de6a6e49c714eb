"""All measurements on one or several checkpoints, with figures side by side and a summary:
what ``lightning-registers analyze`` runs.

The images stream: each backbone reads them in batches from their source in at most three
passes, and keeps per image only what the measures need later, so that memory is bounded by
the batch and those few numbers, whatever the number of images:

1. norms of every layer, neighbour similarity, attention, LOST (on square images), [CLS], the
   outlier norms of the test-time register search, and the position and pixel probes' training
   tokens (a fixed number, chosen before the pass);
2. once the high-norm tokens are known: the probes scored on the test tokens (a few numbers per
   token kept), the two tokens per image the class probe reads, the register neurons' scores;
3. where register neurons were found: the backbone with a test-time register, beside the
   backbone itself (the cosine of each output token before and after).

LOST under ``--protocol reference`` reads the images as they are, in a pass of its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..measures.norms import OUTPUT, RULES, OutlierRule, layer_name
from ..models.config import patch_grid
from .attention import (
    AttentionKeeper,
    last_block_attention,
    plot_attention,
    plot_attention_side_by_side,
)
from .images import ImageSet, load_images
from .loading import LoadedBackbone
from .lost import lost, lost_boxes, lost_result, plot_lost, qkv_features
from .neighbours import patch_similarity, plot_neighbour_similarity, split_by_norm
from .norms import (
    first_high_norm_layer,
    layer_statistics,
    plot_layer_statistics,
    plot_norm_distributions,
)
from .probes import (
    PatchProbes,
    ProbeTokens,
    classification_picks,
    classify_picked,
    patch_pixels,
    picked_tokens,
    plot_probes,
    probe_summary,
)
from .report import write_summary
from .settings import REFERENCE_LOST_K, AnalysisSettings
from .test_time_registers import (
    NeuronScores,
    add_test_time_register,
    all_token_norms,
    find_register_neurons,
    model_family,
    outlier_flags,
)
from .tokens import Observation, batches, device_of, observe, release_freed_memory

PASSES = 3  # over the images, per backbone (see the module)
LOST_SHOWN = 8  # images in the LOST figure
SCORES = ("top1", "distance", "l2")  # what the probes keep of each test token
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


def _lost_k(settings: AnalysisSettings) -> int | None:
    return settings.lost_k or (REFERENCE_LOST_K if settings.reference else None)


def _lost_truth(images: ImageSet, settings: AnalysisSettings) -> list[torch.Tensor]:
    padded = settings.choice("lost_input") == "padded"
    truth = images.original_boxes if padded else images.boxes
    if settings.no_hard:
        truth = [boxes[~hard] for boxes, hard in zip(truth, images.hard, strict=True)]
    return truth


def _lost_scored(result: dict, images: ImageSet, settings: AnalysisSettings) -> dict:
    padded = settings.choice("lost_input") == "padded"
    result["k"] = _lost_k(settings)
    result["drawn_boxes"] = images.to_square(result["boxes"]) if padded else result["boxes"]
    return result


def _corloc_rule(settings: AnalysisSettings) -> dict:
    over = "boxed" if settings.no_hard else settings.choice("corloc_over")
    return {"corloc_over": over, "iou_eps": settings.iou_eps}


def run_lost(backbone: nn.Module, images: ImageSet, settings: AnalysisSettings) -> dict:
    """LOST on ``images`` as the settings' protocol says (input, ties, ``k``, CorLoc's
    denominator and IoU, ``no_hard``), in a pass of its own; ``drawn_boxes``: the boxes in
    pixels of the square images."""
    if settings.choice("lost_input") == "padded":
        stream = images.full_resolution()
    else:
        stream = (image for batch in images.batches(settings.batch_size) for image in batch)
    result = lost(
        backbone,
        stream,
        _lost_truth(images, settings),
        settings.lost_features,
        _lost_k(settings),
        settings.gram_bias,
        settings.batch_size,
        ties=settings.choice("lost_ties"),
        **_corloc_rule(settings),
    )
    return _lost_scored(result, images, settings)


class _Passes:
    """The images' batches for each pass over them, with the pass and the images done on the
    progress bar (a step per pass)."""

    def __init__(self, images: ImageSet, batch_size: int, device, bar=None) -> None:
        self.images, self.batch_size, self.device, self.bar = images, batch_size, device, bar

    def __call__(self, name: str) -> Iterator[tuple[int, torch.Tensor]]:
        """(index of the first image, batch) of each batch, in order."""
        start = 0
        for batch in batches(self.images, self.batch_size, self.device):
            if self.bar is not None:
                self.bar.set_postfix_str(f"{name} {start}/{len(self.images)}")
            yield start, batch
            start += len(batch)
            release_freed_memory()
        self.skip()

    def skip(self) -> None:
        """A pass done, or not needed."""
        if self.bar is not None:
            self.bar.update()


class _Kept:
    """What the analysis keeps of each forward of one backbone over the images: patch-token
    norms of every layer, the attention maps (``AttentionKeeper``) and, on square images,
    LOST's box and seed in each image."""

    def __init__(self, backbone: nn.Module, settings: AnalysisSettings) -> None:
        self.backbone, self.settings = backbone, settings
        self.norms: dict[str, list[torch.Tensor]] = {}
        self.attention = AttentionKeeper(backbone.num_registers, settings.attention_images)
        self.square_lost = settings.choice("lost_input") == "square"
        self.found: list[tuple[torch.Tensor, int]] = []
        self.sizes: list[tuple[int, int]] = []

    def add(self, seen: Observation) -> None:
        for layer, kinds in seen.norms.items():
            self.norms.setdefault(layer, []).append(kinds["patches"].to("cpu", copy=True))
        self.attention.add(last_block_attention(self.backbone, seen))
        if self.square_lost:
            s, patch = self.settings, self.backbone.patch_size
            features = qkv_features(seen.qkv, s.lost_features, self.backbone.num_prefix_tokens)
            sizes = [(seen.grid[0] * patch, seen.grid[1] * patch)] * len(features)
            ties = s.choice("lost_ties")
            self.found += lost_boxes(
                features, seen.grid, patch, sizes, _lost_k(s), s.gram_bias, ties
            )
            self.sizes += sizes

    def result(self, images: ImageSet, high_norm: torch.Tensor | None = None) -> dict:
        """``norms``, ``norm_summary``, the ``high_norm`` flags of the split measures (default:
        by the settings' rule on the output norms), ``attention``, ``attention_on_high_norm``
        and ``lost`` (on padded images in a pass of its own)."""
        norms = {layer: torch.cat(parts) for layer, parts in self.norms.items()}
        if high_norm is None:
            high_norm = self.settings.outlier_rule.mask(norms[OUTPUT])
        maps, on_high = self.attention.result(high_norm)
        if self.square_lost:
            truth = _lost_truth(images, self.settings)
            found = lost_result(self.found, self.sizes, truth, **_corloc_rule(self.settings))
            found = _lost_scored(found, images, self.settings)
        else:
            found = run_lost(self.backbone, images, self.settings)
        return {
            "norms": norms,
            "high_norm": high_norm,
            "norm_summary": _norm_summary(norms, self.settings),
            "attention": maps,
            "attention_on_high_norm": on_high,
            "lost": found,
        }


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
    scalars of ``summary.json``), from passes over ``images`` (see the module); ``progress``:
    a tqdm bar, a step per pass."""
    device, patch = device_of(backbone), backbone.patch_size
    passes = _Passes(images, settings.batch_size, device, progress)
    grid = patch_grid((images.image_size, images.image_size), patch)
    search_layer = layer_name(register_neuron_search(backbone, settings)["layer"])
    kept = _Kept(backbone, settings)
    probe_tokens = ProbeTokens(len(images), grid[0] * grid[1])
    cls, similarity, outlier_norms = [], [], []
    for start, x in passes("norms, neighbours, attention, LOST"):
        seen = observe(backbone, x)
        kept.add(seen)
        cls.append(seen.cls.to("cpu", copy=True))  # not a view holding every token
        similarity.append(patch_similarity(backbone, x))
        outlier_norms.append(all_token_norms(seen.norms[search_layer]).cpu())
        probe_tokens.add(start, seen.patches.cpu(), patch_pixels(x.cpu(), patch))
    result = kept.result(images)
    high = result["high_norm"]
    result["neighbours"] = split_by_norm(torch.cat(similarity), high)
    search = register_neuron_search(
        backbone, settings, result["norm_summary"]["first_high_norm_block"]["relative"]
    )
    result["ttr_search"] = search
    flags = outlier_flags(
        torch.cat(outlier_norms), search["rule"], search["tokens"], backbone.num_prefix_tokens
    )
    neuron_scores = None
    if flags.any():
        blocks = range(search["top_layer"] + 1)
        per_image = search["average"] == "per_image"
        neuron_scores = NeuronScores(backbone, flags, blocks, per_image, search["sparsity"])
    result["probes"] = _probes_pass(
        backbone, images, passes, grid, probe_tokens, torch.cat(cls), high, neuron_scores
    )
    neurons = neuron_scores.best(search["top_k"]) if neuron_scores else []
    result["ttr"] = test_time_register_effect(
        backbone, images, settings, high, search, neurons, progress
    )
    return result


def _probes_pass(
    backbone: nn.Module,
    images: ImageSet,
    passes: _Passes,
    grid: tuple[int, int],
    probe_tokens: ProbeTokens,
    cls: torch.Tensor,
    high_norm: torch.Tensor,
    neuron_scores: NeuronScores | None,
) -> dict:
    """The second pass: the probes scored on the test images' tokens and the class probe on
    the tokens it reads, while ``neuron_scores`` (where given) add up."""
    device, patch = device_of(backbone), backbone.patch_size
    probes = PatchProbes(probe_tokens, grid, device)
    picks = classification_picks(high_norm, images.labels) or {}
    test = torch.zeros(len(images), dtype=torch.bool)
    test[probe_tokens.test] = True
    scores: list[dict] = []
    picked: dict[str, list[torch.Tensor]] = {kind: [] for kind in picks}
    with neuron_scores or nullcontext():
        for start, x in passes("probes, register neurons"):
            if neuron_scores is not None:
                neuron_scores.at(start, len(x))
            patches = observe(backbone, x).patches.cpu()
            here = test[start : start + len(x)]
            if here.any():
                scores.append(probes.score(patches[here], patch_pixels(x.cpu()[here], patch)))
            for kind, choice in picks.items():
                picked[kind].append(picked_tokens(patches, choice[start : start + len(x)]))
    joined = {k: torch.cat([s[k] for s in scores] + [torch.zeros(0)]) for k in SCORES}
    out = probe_summary(joined, high_norm[probe_tokens.test].reshape(-1))
    out["classification"] = None
    if picks:
        tokens = {kind: torch.cat(parts) for kind, parts in picked.items()}
        out["classification"] = classify_picked(cls, picks, tokens, images.labels, device)
    return out


def test_time_register_effect(
    backbone: nn.Module,
    images: ImageSet,
    settings: AnalysisSettings,
    high_norm: torch.Tensor,
    search: dict | None = None,
    neurons: list | None = None,
    progress=None,
) -> dict | None:
    """Add a test-time register for the register ``neurons`` (default: found as ``search``
    says, default ``register_neuron_search``), and measure the norms, attention maps and LOST
    again, in a pass over the images beside the backbone itself; ``normal_token_cosine`` (and
    ``high_norm_token_cosine``): mean cosine similarity of each normal (high-norm, as
    ``high_norm`` flags) output patch token before and after. None without register neurons.
    ``progress``: a tqdm bar, a step for the pass."""
    search = search or register_neuron_search(backbone, settings)
    passes = _Passes(images, settings.batch_size, device_of(backbone), progress)
    if neurons is None:
        neurons = find_register_neurons(
            backbone,
            images,
            search["top_k"],
            search["rule"],
            search["layer"],
            settings.batch_size,
            tokens=search["tokens"],
            top_layer=search["top_layer"],
            average=search["average"],
            sparsity=search["sparsity"],
        )
    if not neurons:
        passes.skip()
        return None
    model = add_test_time_register(backbone, neurons, search["values"])
    kept, cosine = _Kept(model, settings), []
    for _, x in passes("test-time registers"):
        before = observe(backbone, x).patches
        seen = observe(model, x)
        kept.add(seen)
        cosine.append(F.cosine_similarity(seen.patches, before, dim=-1).cpu())
    cosine = torch.cat(cosine)
    normal, high = cosine[~high_norm], cosine[high_norm]
    return {
        "neurons": neurons,
        **kept.result(images, high_norm),
        "normal_token_cosine": normal.mean().item() if len(normal) else None,
        "high_norm_token_cosine": high.mean().item() if len(high) else None,
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
    image_sets: dict[tuple, ImageSet] = {}
    results, inputs = {}, {}
    bar = tqdm(total=len(backbones) * PASSES, desc="analyze", disable=not progress)
    for name, loaded in zip(names, backbones, strict=True):
        bar.set_description(f"analyze {name}")
        size = image_size or loaded.model.img_size[0]
        key = (size, loaded.mean, loaded.std)
        if key not in image_sets:
            image_sets[key] = load_images(image_source, size, loaded.mean, loaded.std, num_images)
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
    """Every figure, models side by side; the few images drawn are read again."""
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
    first: dict[int, torch.Tensor] = {}  # the first images of each image set
    for images in inputs.values():
        if id(images) not in first:
            first[id(images)] = images.head(max(settings.attention_images, LOST_SHOWN, 1))
    attention = {n: r["attention"] for n, r in results.items()}
    attention.update({n + TTR_SUFFIX: t["attention"] for n, t in with_ttr.items()})
    shown = {}
    for name, maps in attention.items():
        images = first[id(inputs[name.removesuffix(TTR_SUFFIX)])][: settings.attention_images]
        shown[name] = (dict(maps, attention=maps["attention"][: len(images)]), images)
    # The attention figures are large images: memory freed after each goes back at once.
    paths.append(plot_attention_side_by_side(shown, out_dir / "attention.png"))
    release_freed_memory()
    for name, (maps, images) in shown.items():
        paths += plot_attention({name: maps}, images, out_dir)
        release_freed_memory()
    rows = {}
    for name, result in results.items():
        x = inputs[name]
        images = first[id(x)][:LOST_SHOWN]
        rows[name] = (images, x.boxes, result["lost"]["drawn_boxes"])
        if name in with_ttr:
            rows[name + TTR_SUFFIX] = (images, x.boxes, with_ttr[name]["lost"]["drawn_boxes"])
    paths.append(plot_lost(rows, out_dir / "lost.png", LOST_SHOWN))
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

"""`analyze` streams: images are read from their source in batches at each pass, no tensor of
every image (or of every token of every image) is ever made, what the results keep grows by a
few numbers per image, and the streamed measures equal the in-memory ones; the attention
figures are drawn band by band, the same picture."""

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image
from planted import PATCH, SIDE, planted_backbone
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_registers.analysis import (
    AnalysisSettings,
    ImageSet,
    analyze_backbone,
    attention_maps,
    layer_statistics,
    load_images,
    lost,
    neighbour_similarity,
    output_tokens,
    patch_norms_by_layer,
    pixel_probe,
    position_probe,
    token_classification,
)
from lightning_registers.analysis import attention as attention_module
from lightning_registers.analysis import probes as probes_module
from lightning_registers.analysis.figure_style import save
from lightning_registers.data import write_demo_shards
from lightning_registers.measures.attention import attention_grids

BATCH = 4
MEAN, STD = (0.5,) * 3, (0.25,) * 3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    write_demo_shards(root, train=0, val=24, size=SIDE, seed=0, maxcount=16, progress=False)
    return str(root / "val" / "*.tar")


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation makes."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, tuple | list) else [out]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def kept_tensors(tree, found=None) -> dict:
    """Every tensor in a result (dicts, lists, tuples), once each, by storage."""
    found = {} if found is None else found
    if isinstance(tree, torch.Tensor):
        found[tree.untyped_storage().data_ptr()] = tree
    elif isinstance(tree, dict):
        for value in tree.values():
            kept_tensors(value, found)
    elif isinstance(tree, list | tuple):
        for value in tree:
            kept_tensors(value, found)
    return found


def instrumented_run(monkeypatch, shards, count, largest=None):
    """``analyze_backbone`` of the planted backbone on ``count`` images (operations watched by
    ``largest`` where given): its result, the images read and the largest batch read."""
    read, sizes = [0], []
    real_read, real_batches = ImageSet.read, ImageSet.batches

    def counting_read(self):
        for image in real_read(self):
            read[0] += 1
            yield image

    def recorded_batches(self, batch_size):
        for batch in real_batches(self, batch_size):
            sizes.append(len(batch))
            yield batch

    def every_image(self):
        raise AssertionError("the analysis made a tensor of every image")

    monkeypatch.setattr(ImageSet, "read", counting_read)
    monkeypatch.setattr(ImageSet, "batches", recorded_batches)
    monkeypatch.setattr(ImageSet, "images", property(every_image))
    images = load_images(shards, SIDE, MEAN, STD, limit=count)
    model = planted_backbone()
    with largest or contextlib.nullcontext():
        result = analyze_backbone(model, images, AnalysisSettings(batch_size=BATCH))
    return result, read[0], max(sizes)


def test_analyze_reads_batches_and_keeps_a_few_numbers_per_image(monkeypatch, shards):
    monkeypatch.setattr(probes_module, "MAX_TOKENS", 256)  # the probes' training tokens, capped
    small, read_small, batch_small = instrumented_run(monkeypatch, shards, 8)
    largest = LargestTensor()
    large, read_large, batch_large = instrumented_run(monkeypatch, shards, 24, largest)
    # Three passes over the images (the planted backbone has register neurons), a batch at a
    # time: no image is read outside a pass.
    assert large["ttr"] is not None
    assert (read_small, read_large) == (3 * 8, 3 * 24)
    assert batch_small == batch_large == BATCH

    grid, width, heads, layers = SIDE // PATCH, 64, 4, 5  # planted: 4 blocks and the output
    patches = grid * grid
    # The largest tensor made is one batch's last-block attention weights (with the test-time
    # register: [CLS], the register and the patches), not a tensor of every token or image.
    tokens = 2 + patches
    assert largest.largest == BATCH * heads * tokens * tokens < 24 * patches * width
    assert largest.largest < 24 * 3 * SIDE * SIDE

    bytes_small = sum(t.nbytes for t in kept_tensors(small).values())
    bytes_large = sum(t.nbytes for t in kept_tensors(large).values())
    per_image = (bytes_large - bytes_small) / 16
    # Per image, at most the norms of every layer before and after the test-time register and
    # four more numbers per patch (a fifth of one image's output tokens).
    assert per_image <= (2 * layers + 4) * patches * 4 < patches * width * 4 / 4
    assert all(t.numel() < 24 * patches * width / 4 for t in kept_tensors(large).values())


def test_streamed_measures_equal_the_in_memory_ones(shards):
    images = load_images(shards, SIDE, MEAN, STD, limit=12)
    x = images.images
    model = planted_backbone()
    settings = AnalysisSettings(batch_size=BATCH)
    result = analyze_backbone(model, images, settings)

    norms = patch_norms_by_layer(model, x, BATCH)
    for layer, values in norms.items():
        assert torch.equal(result["norms"][layer], values), layer
    assert result["norm_summary"]["layers"] == layer_statistics(norms)
    high = settings.outlier_rule.mask(norms["output"])
    assert torch.equal(result["high_norm"], high)
    neighbours = neighbour_similarity(model, x, high, BATCH)
    assert result["neighbours"]["mean_normal"] == pytest.approx(neighbours["mean_normal"])
    assert result["neighbours"]["mean_high_norm"] == pytest.approx(neighbours["mean_high_norm"])
    maps = attention_maps(model, x, BATCH)["attention"]
    torch.testing.assert_close(result["attention"]["attention"], maps[: settings.attention_images])
    found = lost(model, x, images.boxes, batch_size=BATCH)
    assert torch.equal(result["lost"]["boxes"], found["boxes"])
    assert result["lost"]["corloc"] == found["corloc"]

    # The probes keep only their training tokens and a few numbers per test token, and give
    # what the probes on every token in memory give.
    cls, patches = output_tokens(model, x, BATCH)
    probes = result["probes"]
    position = position_probe(patches, (SIDE // PATCH,) * 2, high)
    assert probes["position"]["test_tokens"] == position["test_tokens"]
    assert probes["position"]["top1"] == pytest.approx(position["top1"])
    assert probes["position"]["distance"] == pytest.approx(position["distance"])
    assert probes["pixels"]["l2"] == pytest.approx(pixel_probe(patches, x, PATCH, high)["l2"])
    assert probes["classification"] == token_classification(cls, patches, high, images.labels)


def test_image_batches_are_the_images_read_again_in_order(shards):
    images = load_images(shards, SIDE, MEAN, STD, limit=10)
    batches = list(images.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    every = torch.cat(batches)
    assert torch.equal(every, torch.cat(list(images.batches(10))))
    assert torch.equal(images.head(3), every[:3])

    # A source that changes between two reads is named, not analysed half old, half new.
    images.names[5] = "another image"
    with pytest.raises(RuntimeError, match="changed while it was analysed: image 5"):
        list(images.batches(4))


def test_attention_grids_drawn_in_bands_are_the_picture_drawn_whole(tmp_path, monkeypatch):
    maps = torch.rand(3, 2, 2, 4, 4)
    grid = attention_grids(maps, ["cls", "reg0"], torch.rand(3, 3, 32, 32), labelled=True)
    image = grid["mean"][0]
    assert len(attention_module._white_gaps(image)) >= 2  # between the columns: bands
    pictures = {}
    for how in ("bands", "whole"):
        if how == "whole":  # one image, as matplotlib draws it unaided
            monkeypatch.setattr(
                attention_module,
                "show_in_bands",
                lambda ax, image: ax.imshow(image.permute(1, 2, 0).numpy()),
            )
        save(attention_module.draw_grids({"a model": image}), tmp_path / f"{how}.png")
        with Image.open(tmp_path / f"{how}.png") as png:
            pictures[how] = np.asarray(png).astype(int)
    difference = np.abs(pictures["bands"] - pictures["whole"])
    assert difference.max() <= 2  # a rounding of the resampling, nowhere more
    assert (difference > 0).mean() < 0.05

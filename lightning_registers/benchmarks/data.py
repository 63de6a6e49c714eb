"""Data pipelines. At the demo's size: samples/s of each objective's transform (decode +
augment + collate) at 2 workers, next to webdataset's plain decode over the same shards and the
demo model's training rate, so that the loader is shown not to be what the demo waits for. At
paper resolution: DINOv2's multi-crop and DeiT-III's 3-Augment on JPEG photos of 500x375 px,
samples/s per core of ours (per sample, and with ``photometric_on_device``: the loader's part
and, apart, the batched stage's cost on this CPU) against the torchvision PIL pipelines that
dinov2 and deit compose, measured side by side with the same loader settings."""

from __future__ import annotations

import io
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import webdataset as wds
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image, ImageFilter
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as T

from lightning_registers.data import (
    ClipTransform,
    MultiCropTransform,
    ShardStream,
    ThreeAugment,
    expand_urls,
    generate_scene,
    write_demo_shards,
)
from lightning_registers.data.writers import write_shards
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import SupervisedModule

DEMO = Path("data/demo/train")


def loader_rate(loader, samples: int) -> float:
    iterator = iter(loader)
    next(iterator)  # workers started, first batch made
    start, seen = time.perf_counter(), 0
    for batch in iterator:
        first = batch[0] if isinstance(batch, list | tuple) else next(iter(batch.values()))
        seen += len(first)
        if seen >= samples:
            break
    return seen / (time.perf_counter() - start)


def demo_model() -> SupervisedModule:
    """configs/demo/supervised.yaml's module (64 px, vit_tiny depth 4, patch 8, 4 registers)."""
    torch.manual_seed(0)
    return SupervisedModule(
        RegisterViT("vit_tiny", img_size=64, patch_size=8, depth=4, layerscale_init=1e-4),
        num_classes=10,
        image_size=64,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        bce_loss=False,
    )


def demo_step_seconds(batch_size: int = 128, steps: int = 5) -> float:
    """Seconds of one float32 forward+backward+AdamW step of the demo model."""
    model = demo_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(batch_size, 3, 64, 64), torch.randint(0, 10, (batch_size,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def run() -> list[str]:
    """The demo-size and the paper-resolution sections."""
    return demo_section() + [""] + paper_section()


def demo_section(samples: int = 2048, batch_size: int = 64, workers: int = 2) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        if DEMO.is_dir() and list(DEMO.glob("*.tar")):
            urls = expand_urls(str(DEMO / "*.tar"))
        else:
            write_demo_shards(tmp, train=4000, val=10, size=64, maxcount=1000, progress=False)
            urls = expand_urls(str(Path(tmp) / "train" / "*.tar"))
        plain = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        plain = plain.decode("torchrgb").to_tuple("png", "cls")
        rates = {
            "webdataset plain decode (peer)": loader_rate(
                DataLoader(plain, batch_size=batch_size, num_workers=workers), samples
            )
        }
        transforms = {
            "supervised (3-Augment)": ThreeAugment(64, crop="src"),
            "clip (open_clip transform + tokenizer)": ClipTransform(64),
            "dino (2 global 64 px + 8 local 32 px crops, iBOT masks)": MultiCropTransform(
                64, 32, num_local_crops=8, patch_size=8
            ),
        }
        for name, transform in transforms.items():
            stream = ShardStream(
                urls, transform, train=True, samples_per_epoch=10**9, batch_size=batch_size
            )
            loader = DataLoader(stream, batch_size=batch_size, num_workers=workers)
            rates[name] = loader_rate(loader, samples)
    model_rate = 128 / demo_step_seconds(128)
    lines = [
        "## Data pipelines",
        "",
        f"{samples} samples of 64 px demo scenes, batch {batch_size}, {workers} DataLoader "
        "workers; each rate is measured alone. The demo model's rate is a float32 "
        "forward+backward+AdamW step of configs/demo/supervised.yaml's backbone at batch 128. "
        "In the demo both share the same 2 cores, so the loader must be several times "
        "faster than the model to stay out of its way.",
        "",
        "| pipeline | samples/s | vs plain decode | vs demo model step |",
        "|---|---|---|---|",
    ]
    peer = rates["webdataset plain decode (peer)"]
    for name, rate in rates.items():
        lines.append(f"| {name} | {rate:.0f} | {rate / peer:.2f} | {rate / model_rate:.1f}x |")
    lines.append(f"| demo model train step | {model_rate:.0f} | | 1.0x |")
    return lines


# --- paper resolution: ours against the torchvision PIL pipelines of dinov2 and deit --------

PAPER_SIZE = (500, 375)
"""Width and height of the JPEG scenes: a typical ImageNet or VOC photo."""


def write_paper_shards(folder: str | Path, count: int = 64) -> list[str]:
    """``count`` demo scenes of 500x375 px as JPEGs (quality 90) in two shards under ``folder``;
    their URLs."""
    width, height = PAPER_SIZE
    top = (width - height) // 2

    def samples():
        for i in range(count):
            image, label, _, _ = generate_scene(0, "train", i, size=width)
            buffer = io.BytesIO()
            image.crop((0, top, width, top + height)).save(buffer, format="JPEG", quality=90)
            yield {"__key__": f"scene-{i:06d}", "jpg": buffer.getvalue(), "cls": b"%d" % label}

    write_shards(samples(), folder, "scenes", maxcount=-(-count // 2), progress=False)
    return expand_urls(str(Path(folder) / "scenes-*.tar"))


class PILPipeline:
    """A webdataset sample as the reference code treats an image: decoded by PIL to RGB, then
    each transform of ``crops[name]`` applied once, stacked under ``name``."""

    def __init__(self, crops: dict[str, list[Callable]]) -> None:
        self.crops = crops

    def __call__(self, sample: dict) -> dict:
        image = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        out = {name: torch.stack([t(image) for t in ts]) for name, ts in self.crops.items()}
        out["label"] = int(sample["cls"])
        return out


def _to_tensor() -> list:
    return [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]


def dinov2_pipeline() -> PILPipeline:
    """dinov2's DataAugmentationDINO at 224/98 px with 8 local crops: random resized crop and
    flip, colour jitter (p 0.8), grayscale (p 0.2), its Gaussian blur (kernel 9, applied with
    1 - p: 0.0 / 0.9 / 0.5), solarize (second global crop, p 0.2), ToTensor, Normalize."""

    def crop(size: int, scale: tuple[float, float], blur: float, *extra) -> T.Compose:
        bicubic = T.InterpolationMode.BICUBIC
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=scale, interpolation=bicubic),
                T.RandomHorizontalFlip(),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur),
                *extra,
                *_to_tensor(),
            ]
        )

    global1 = crop(224, (0.32, 1.0), 0.0)
    global2 = crop(224, (0.32, 1.0), 0.9, T.RandomSolarize(128, p=0.2))
    local = crop(98, (0.05, 0.32), 0.5)
    return PILPipeline({"global_crops": [global1, global2], "local_crops": [local] * 8})


class _RadiusBlur:
    """DeiT-III's blur: PIL's GaussianBlur with a radius uniform in 0.1-2 px."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(random.uniform(0.1, 2.0)))


def deit3_pipeline() -> PILPipeline:
    """DeiT-III's 3-Augment with its simple random crop (``--src``) at 224 px: resize, random
    crop with 4 px reflect padding, flip, one of grayscale / solarize / PIL blur, colour jitter
    0.3, ToTensor, Normalize."""
    one_of = [T.Grayscale(3), T.RandomSolarize(128, p=1.0), _RadiusBlur()]
    transform = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomCrop(224, padding=4, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.RandomChoice(one_of),
            T.ColorJitter(0.3, 0.3, 0.3),
            *_to_tensor(),
        ]
    )
    return PILPipeline({"image": [transform]})


def shard_loader(urls: list[str], transform, batch_size: int, workers: int) -> DataLoader:
    stream = ShardStream(
        urls, transform, train=True, samples_per_epoch=10**9, batch_size=batch_size
    )
    collate = getattr(transform, "collate", default_collate)
    return DataLoader(stream, batch_size=batch_size, num_workers=workers, collate_fn=collate)


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on ``device`` (a GPU runs them after the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_seconds_per_sample(stage, batch: dict, device: torch.device, repeats: int = 3) -> float:
    """Seconds per sample of ``stage`` (a transform's ``batch_stage``, which
    ``photometric_on_device`` runs after the transfer) on ``batch`` moved to ``device``: the
    fastest of ``repeats`` calls after a warm-up, each waited for on a GPU."""
    batch = move_data_to_device(batch, device)
    stage(batch)
    synchronize(device)
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        stage(batch)
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest / len(next(value for value in batch.values() if torch.is_tensor(value)))


def _stage_rate(transform, urls: list[str], batch_size: int) -> float:
    """Samples/s of ``transform.batch_stage`` on one CPU thread."""
    batch = next(iter(shard_loader(urls, transform, batch_size, 0)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return 1 / stage_seconds_per_sample(transform.batch_stage, batch, torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def _compare(urls, pipelines: dict, samples: dict, batch_size: int, workers: int, rounds: int):
    """Samples/s per core of each pipeline: the best of ``rounds`` measurements, the pipelines
    taking turns so that drift of a shared machine hits all of them."""
    best = dict.fromkeys(pipelines, 0.0)
    for _ in range(rounds):
        for name, transform in pipelines.items():
            loader = shard_loader(urls, transform, batch_size, workers)
            best[name] = max(best[name], loader_rate(loader, samples[name]) / workers)
    return best


def paper_section(workers: int = 1, rounds: int = 3) -> list[str]:
    """DINO multi-crop and 3-Augment at paper resolution, ours against the PIL references."""
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_paper_shards(tmp)
        dino = {
            "reference": dinov2_pipeline(),
            "ours": MultiCropTransform(224, 98, blur_probabilities=(0.0, 0.9, 0.5)),
            "loader": MultiCropTransform(
                224, 98, blur_probabilities=(0.0, 0.9, 0.5), photometric_on_device=True
            ),
        }
        three = {
            "reference": deit3_pipeline(),
            "ours": ThreeAugment(224, crop="src", blur="pil"),
            "loader": ThreeAugment(224, crop="src", blur="pil", photometric_on_device=True),
        }
        rates = {
            "dino": _compare(
                urls, dino, {"reference": 48, "ours": 48, "loader": 256}, 16, workers, rounds
            ),
            "three": _compare(
                urls, three, {"reference": 256, "ours": 256, "loader": 1024}, 32, workers, rounds
            ),
        }
        rates["dino"]["stage"] = _stage_rate(dino["loader"], urls, 16)
        rates["three"]["stage"] = _stage_rate(three["loader"], urls, 32)
    for r in rates.values():
        r["both"] = 1 / (1 / r["loader"] + 1 / r["stage"])
    rows = [
        ("reference", "torchvision PIL pipeline as the paper's code composes it"),
        ("ours", "ours, per sample (photometric in the worker; the default)"),
        ("loader", "ours, photometric_on_device: the loader's part (decode, crops, flips)"),
        ("stage", "ours, photometric_on_device: the batched stage, on this CPU (1 thread)"),
        ("both", "ours, photometric_on_device: loader and stage on the same core"),
    ]
    lines = [
        "## Data pipelines at paper resolution",
        "",
        f"JPEG scenes of {PAPER_SIZE[0]}x{PAPER_SIZE[1]} px (quality 90). DINO: DINOv2's "
        "multi-crop at 224/98 px with 8 local crops (blur 0.0 / 0.9 / 0.5 as dinov2 runs, "
        "iBOT masks for ours), against dinov2's DataAugmentationDINO composed in torchvision "
        "(PIL decode, RandomResizedCrop, flip, ColorJitter, RandomGrayscale, GaussianBlur, "
        "RandomSolarize, ToTensor, Normalize). 3-Augment: DeiT-III's with the simple random "
        "crop and PIL blur at 224 px, against deit's augment.py composition. Samples/s per "
        f"core: one DataLoader worker each (batch 16 for DINO, 32 for 3-Augment), the best of "
        f"{rounds} rounds taking turns; the batched stage (on a GPU after the transfer) is "
        "timed here on one CPU thread, to show what it would cost on the CPU.",
        "",
        "| pipeline | DINO samples/s per core | vs dinov2's | 3-Augment samples/s per core "
        "| vs deit's |",
        "|---|---|---|---|---|",
    ]
    for key, label in rows:
        d, t = rates["dino"][key], rates["three"][key]
        d_ref, t_ref = rates["dino"]["reference"], rates["three"]["reference"]
        lines.append(f"| {label} | {d:.1f} | {d / d_ref:.2f}x | {t:.1f} | {t / t_ref:.2f}x |")
    verdict = [
        f"{name} {rates[key]['loader'] / rates[key]['reference']:.1f}x"
        for key, name in (("dino", "DINO"), ("three", "3-Augment"))
    ]
    lines += [
        "",
        "Bar: the loader (photometric_on_device) delivers >= 2.0x the reference's samples/s "
        f"per core: {', '.join(verdict)}.",
    ]
    return lines

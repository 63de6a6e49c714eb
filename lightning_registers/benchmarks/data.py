"""Data pipelines: samples/s of each objective's transform (decode + augment + collate) at 2
workers, next to webdataset's plain decode over the same shards and the demo model's training
rate, so that the loader is shown not to be what the demo waits for."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from lightning_registers.data import (
    ClipTransform,
    MultiCropTransform,
    ShardStream,
    ThreeAugment,
    expand_urls,
    write_demo_shards,
)
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import SupervisedModule

DEMO = Path("data/demo/train")


def _rate(loader, samples: int) -> float:
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


def run(samples: int = 2048, batch_size: int = 64, workers: int = 2) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        if DEMO.is_dir() and list(DEMO.glob("*.tar")):
            urls = expand_urls(str(DEMO / "*.tar"))
        else:
            write_demo_shards(tmp, train=4000, val=10, size=64, maxcount=1000, progress=False)
            urls = expand_urls(str(Path(tmp) / "train" / "*.tar"))
        plain = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        plain = plain.decode("torchrgb").to_tuple("png", "cls")
        rates = {
            "webdataset plain decode (peer)": _rate(
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
            rates[name] = _rate(loader, samples)
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

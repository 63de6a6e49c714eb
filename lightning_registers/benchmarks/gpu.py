"""On one GPU, in bf16-mixed: training-step images/s, model FLOPs utilization (MFU) and peak
memory of ViT-B/16 at 224 px (supervised) and ViT-L/14 under DINOv2's multi-crop (2 x 224 px
global crops with a teacher pass, 8 x 98 px local crops), ours against timm's
VisionTransformer with the same weights, eager and compiled; and the samples/s one DataLoader
worker delivers for each pipeline beside what the step consumes.

``python -m lightning_registers.benchmarks gpu`` takes about 8 minutes and replaces the GPU
section of BENCHMARKS.md. A step is the backbone's: forward of the crops, a stand-in loss where
the objective's heads would be (they cost a few percent of a ViT-L step), backward and a fused
AdamW step. Model FLOPs are those of forward and backward counted by torch's FlopCounterMode
on the eager model, without recomputation (compilation does the same work faster); MFU
divides the achieved rate by the device's dense bf16 peak from ``PEAK_BF16_TFLOPS``.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lightning_registers.data import MultiCropTransform, ThreeAugment
from lightning_registers.models import RegisterViT, create_timm_model
from lightning_registers.models.regional_compile import compile_blocks

from .data import (
    loader_rate,
    shard_loader,
    stage_seconds_per_sample,
    synchronize,
    write_paper_shards,
)

# Dense (not sparse) bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s, by a
# pattern of torch.cuda.get_device_name(); the first match counts.
PEAK_BF16_TFLOPS = (
    (r"GH200|H200", 989.0),
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100|H800", 989.0),
    (r"B200", 2250.0),
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"L4\b", 121.0),
)
NOT_MEASURED = [
    "## GPU: training step, MFU, memory and loaders",
    "",
    "Not yet measured: no GPU was at hand where this file was written. "
    "`python -m lightning_registers.benchmarks gpu` measures it in about 8 minutes on one GPU "
    "and replaces this section.",
]


def _attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_flop_count(query, key, value)


# Model FLOPs, as MFU counts them: an attention backward is two forwards (torch counts the
# kernels' recomputation of the scores too), and the CPU kernel, which torch does not count,
# counts like the GPU ones (CPU checks of the count use it).
ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention,
    **{
        op: _attention_backward
        for op in (
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
            torch.ops.aten._scaled_dot_product_flash_attention_backward,
            torch.ops.aten._scaled_dot_product_efficient_attention_backward,
            torch.ops.aten._scaled_dot_product_cudnn_attention_backward,
        )
    },
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the device named ``device_name``, or None when unknown."""
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


@dataclass(frozen=True)
class Workload:
    """One training step: the backbone, the batch, the crops (count, side) that go through
    forward and backward, and the crops a no-grad teacher copy sees."""

    name: str
    backbone: dict
    batch_size: int
    crops: tuple[tuple[int, int], ...]
    teacher_crops: tuple[tuple[int, int], ...] = ()


WORKLOADS = (
    Workload(
        "ViT-B/16 supervised, 224 px",
        dict(arch="vit_base", img_size=224, patch_size=16, num_registers=4, layerscale_init=1e-4),
        batch_size=128,
        crops=((1, 224),),
    ),
    Workload(
        "ViT-L/14 DINOv2 multi-crop, 2 x 224 + 8 x 98 px",
        dict(arch="vit_large", img_size=224, patch_size=14, num_registers=4, layerscale_init=1e-5),
        batch_size=32,
        crops=((2, 224), (8, 98)),
        teacher_crops=((2, 224),),
    ),
)
MODES = (("ours", False), ("timm", False), ("ours", True), ("timm", True))


def build(workload: Workload, impl: str, compiled: bool, device: torch.device):
    """Student and teacher (None without teacher crops) of ``impl``, both of the same weights."""

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        model = RegisterViT(**workload.backbone)
        return (create_timm_model(model) if impl == "timm" else model).to(device)

    model = make()
    teacher = make().requires_grad_(False) if workload.teacher_crops else None
    if compiled:
        compile_blocks(model.blocks)
        if teacher is not None:
            compile_blocks(teacher.blocks)
    return model, teacher


def crops_for(workload: Workload, device: torch.device, teacher: bool = False) -> list:
    sides = workload.teacher_crops if teacher else workload.crops
    generator = torch.Generator(device).manual_seed(0)
    return [
        torch.randn(count * workload.batch_size, 3, side, side, device=device, generator=generator)
        for count, side in sides
    ]


def train_step(model, teacher, crops, teacher_crops, optimizer, dtype) -> None:
    """Forward of every crop (and the teacher's), a stand-in loss, backward, optimizer step."""
    device_type = crops[0].device.type
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        with torch.no_grad():
            for x in teacher_crops:
                teacher(x)
        loss = sum(model(x).float().square().mean() for x in crops)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_flops(workload: Workload, device: torch.device, dtype=torch.bfloat16) -> int:
    """Model FLOPs of one step (forwards and backward, eager), counted on ``device``."""
    model, teacher = build(workload, "ours", False, device)
    crops, teacher_crops = crops_for(workload, device), crops_for(workload, device, True)
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # counted steps change nothing
    with counter:
        train_step(model, teacher, crops, teacher_crops, optimizer, dtype)
    return counter.get_total_flops()


def measure(
    workload: Workload,
    impl: str,
    compiled: bool,
    device: torch.device,
    steps: int = 10,
    warmup: int = 3,
    dtype=torch.bfloat16,
) -> dict:
    """Images/s and peak memory of ``steps`` training steps after ``warmup`` (which compiles)."""
    model, teacher = build(workload, impl, compiled, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    crops, teacher_crops = crops_for(workload, device), crops_for(workload, device, True)
    for _ in range(warmup):
        train_step(model, teacher, crops, teacher_crops, optimizer, dtype)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, teacher, crops, teacher_crops, optimizer, dtype)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"images_per_s": workload.batch_size / seconds, "step_s": seconds, "peak_bytes": peak}


def paper_pipelines() -> dict[str, tuple[str, object]]:
    """The training transforms at paper sizes, by name: (the workload they feed, transform)."""
    supervised, dino = (w.name for w in WORKLOADS)
    multi_crop = dict(patch_size=14, blur_probabilities=(0.0, 0.9, 0.5))
    return {
        "3-Augment 224 px, per sample": (supervised, ThreeAugment(224, crop="src", blur="pil")),
        "3-Augment 224 px, photometric_on_device": (
            supervised,
            ThreeAugment(224, crop="src", blur="pil", photometric_on_device=True),
        ),
        "multi-crop 2 x 224 + 8 x 98 px, per sample": (
            dino,
            MultiCropTransform(224, 98, **multi_crop),
        ),
        "multi-crop 2 x 224 + 8 x 98 px, photometric_on_device": (
            dino,
            MultiCropTransform(224, 98, **multi_crop, photometric_on_device=True),
        ),
    }


def loader_rates(
    demand: dict[str, float],
    device: torch.device,
    samples: int = 128,
    batch_size: int = 16,
) -> list[str]:
    """Samples/s of one DataLoader worker for each paper-size pipeline on JPEG shards of
    500 x 375 scenes, beside the step's demand (the fastest images/s of its workload); for a
    pipeline with ``photometric_on_device``, the time its batched stage takes on ``device`` as a
    share of the step's time for the same images."""
    lines = [
        "| pipeline | samples/s per worker | step demand (images/s) | workers per GPU needed "
        "| on-device stage, % of step time |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_paper_shards(tmp, count=samples)
        for name, (workload, transform) in paper_pipelines().items():
            loader = shard_loader(urls, transform, batch_size, workers=1)
            rate = loader_rate(loader, samples)
            need = demand[workload]
            share = "none (in the worker)"
            if transform.batch_stage is not None:
                batch = next(iter(shard_loader(urls, transform, batch_size, workers=0)))
                seconds = stage_seconds_per_sample(transform.batch_stage, batch, device, repeats=5)
                share = f"{100 * seconds * need:.1f}"
            lines.append(f"| {name} | {rate:.1f} | {need:.0f} | {need / rate:.1f} | {share} |")
    return lines


def run(device: torch.device | None = None) -> list[str]:
    """The GPU section of BENCHMARKS.md, measured on ``device`` (the first GPU)."""
    device = device or torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name)
    rows, demand = [], {}
    start = time.perf_counter()
    for workload in WORKLOADS:
        flops = step_flops(workload, device)
        for impl, compiled in MODES:
            result = measure(workload, impl, compiled, device)
            achieved = flops / result["step_s"] / 1e12
            mfu = f"{100 * achieved / peak:.1f} %" if peak else "n/a (peak unknown)"
            demand[workload.name] = max(demand.get(workload.name, 0), result["images_per_s"])
            memory = result["peak_bytes"]
            memory = f"{memory / 2**30:.1f}" if memory is not None else "n/a"
            rows.append(
                f"| {workload.name} | {impl} | {'compiled' if compiled else 'eager'} "
                f"| {result['images_per_s']:.1f} | {1000 * result['step_s']:.1f} "
                f"| {achieved:.1f} | {mfu} | {memory} |"
            )
            # Each row as it is measured, so that a run cut short still leaves its numbers.
            print(f"[{time.perf_counter() - start:.0f} s] {rows[-1]}", flush=True)
            torch.cuda.empty_cache()
    peak_text = f"{peak:.0f} TFLOP/s dense bf16" if peak else "peak unknown"
    return [
        *NOT_MEASURED[:2],
        f"Command: `python -m lightning_registers.benchmarks gpu`; device: {name} "
        f"({peak_text}); torch {torch.__version__}; date: {time.strftime('%Y-%m-%d')}.",
        "",
        "bf16-mixed (float32 weights, fused AdamW); 3 warm-up steps (which compile), then the "
        "mean of 10; compiled = each block compiled (`compile: true`). Loaders: one worker on "
        "this machine's CPU over JPEG scenes of 500 x 375 px; with photometric_on_device the "
        "photometric stage runs on the GPU after the transfer: it is not in the step's time "
        "above, and its last column is its own time on the GPU, per image, as a share of the "
        "step's time per image.",
        "",
        "| workload | model | mode | images/s | step ms | TFLOP/s | MFU | peak memory GiB |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *loader_rates(demand, device),
    ]

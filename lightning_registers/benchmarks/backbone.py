"""RegisterViT against timm's VisionTransformer of the same configuration, and compiled
(regional compilation, as ``compile: true`` trains) against eager: speed and memory.

Speed: the three models train in one process, a step of each in turn, so that a shared
machine's drift (which moves step times by 10 % within minutes) hits all three alike; each
model's fastest step counts. Memory: each model trains in its own process, so that the peak
resident memory of one is not hidden by another's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from lightning_registers.models import RegisterViT, create_timm_model
from lightning_registers.models.regional_compile import compile_blocks

IMPLS = ("ours", "timm", "compiled")
# Matrix products and fused attention: kernels that a compiled block calls as eager does, so
# that compiling can speed up only the rest of a step (the elementwise ops and norms it fuses).
LIBRARY_KERNELS = ("aten::mm", "aten::addmm", "aten::bmm")
LIBRARY_KERNEL_PREFIX = "aten::_scaled_dot_product"


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _is_library(event) -> bool:
    return event.name in LIBRARY_KERNELS or event.name.startswith(LIBRARY_KERNEL_PREFIX)


def library_share(step) -> float:
    """Share of the operators' CPU time in one call of ``step`` spent in matrix products and
    fused attention, with what they call (attention's backward fills its gradients)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        step()
    total = library = 0.0
    for event in profile.events():
        total += event.self_cpu_time_total
        caller = event
        while caller is not None and not _is_library(caller):
            caller = caller.cpu_parent
        if caller is not None:
            library += event.self_cpu_time_total
    return library / total


def build(impl: str, num_registers: int) -> torch.nn.Module:
    """ViT-S/16 at 224 px as ``impl`` trains it; the same weights for every ``impl``."""
    torch.manual_seed(0)
    model = RegisterViT("vit_small", img_size=224, patch_size=16, num_registers=num_registers)
    if impl == "timm":
        return create_timm_model(model)
    if impl == "compiled":
        compile_blocks(model.blocks)
    return model


def train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def measure_speed(num_registers: int, batch_size: int, rounds: int) -> dict:
    """Images/s of each model in its fastest of ``rounds`` steps, the models taking turns
    (the order rotating every round), after a warm-up step each (which compiles); and the
    share of ours' step in library kernels (``library_share``)."""
    torch.set_num_threads(os.cpu_count() or 1)
    models = {impl: build(impl, num_registers) for impl in IMPLS}
    x = torch.randn(batch_size, 3, 224, 224)
    fastest = dict.fromkeys(IMPLS, float("inf"))
    for model in models.values():
        train_step(model, x)
    for round in range(rounds):
        shift = round % len(IMPLS)
        for impl in IMPLS[shift:] + IMPLS[:shift]:
            start = time.perf_counter()
            train_step(models[impl], x)
            fastest[impl] = min(fastest[impl], time.perf_counter() - start)
    share = library_share(lambda: train_step(models["ours"], x))
    return {"images_per_s": {k: batch_size / v for k, v in fastest.items()}, "library_share": share}


def measure_memory(impl: str, num_registers: int, batch_size: int) -> dict:
    """Resident memory before the first training step of ``impl`` (the model and its input),
    for the parent to subtract from this process's peak."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = build(impl, num_registers)
    x = torch.randn(batch_size, 3, 224, 224)
    baseline = _rss_bytes()
    for _ in range(2):
        train_step(model, x)
    return {"baseline_rss": baseline}


def _run_child(call: str) -> tuple[dict, int]:
    """The JSON that ``call`` (a function of this module) returns in a fresh process, and the
    process's peak resident memory in bytes."""
    code = (
        "import json; from lightning_registers.benchmarks import backbone; "
        f"print(json.dumps(backbone.{call}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"benchmark child {call} failed with status {status}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024


def run(rounds: int = 10, batch_size: int = 32) -> list[str]:
    """Markdown lines for BENCHMARKS.md."""
    lines = [
        "| registers | ours img/s | timm img/s | compiled img/s | ours/timm speed "
        "| compiled/ours speed | ours step MiB | timm step MiB | compiled step MiB "
        "| ours/timm memory | matmul + attention share of ours' step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for num_registers in (0, 4):
        result, _ = _run_child(f"measure_speed({num_registers}, {batch_size}, {rounds})")
        speed, share = result["images_per_s"], result["library_share"]
        memory = {}
        for impl in IMPLS:
            child, peak = _run_child(f"measure_memory({impl!r}, {num_registers}, {batch_size})")
            memory[impl] = (peak - child["baseline_rss"]) / 2**20
        lines.append(
            f"| {num_registers} | {speed['ours']:.2f} | {speed['timm']:.2f} "
            f"| {speed['compiled']:.2f} | {speed['ours'] / speed['timm']:.3f} "
            f"| {speed['compiled'] / speed['ours']:.3f} | {memory['ours']:.0f} "
            f"| {memory['timm']:.0f} | {memory['compiled']:.0f} "
            f"| {memory['ours'] / memory['timm']:.3f} | {100 * share:.0f} % |"
        )
    return [
        "## Backbone: RegisterViT vs timm VisionTransformer, compiled vs eager",
        "",
        f"vit_small, patch 16, 224 px, batch {batch_size}, float32 forward+backward on CPU. "
        f"Speed: the three models take turns in one process for {rounds} rounds of a step each "
        "(after a warm-up step each, which compiles), and each model's fastest step counts (a "
        "shared machine only ever slows a step down); compiled is ours with each block compiled "
        "(`compile: true`). Memory: the peak resident memory of two steps above the model's "
        "own, each model in its own process. The last column is the share of ours' operator "
        "time (torch.profiler, one step) in matrix products and fused attention, which a "
        "compiled block calls as eager does: compiling fuses only the rest (norms, GELU, "
        "residual adds, reshapes), so on a CPU in float32 it can gain at most 1 / (that share) "
        "and in practice gains a fraction of the rest.",
        "",
        *lines,
    ]

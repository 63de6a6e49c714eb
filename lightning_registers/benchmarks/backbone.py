"""RegisterViT against timm's VisionTransformer of the same configuration, and compiled
(regional compilation, as ``compile: true`` trains) against eager: speed and memory.

Each measurement runs in its own process, so that the peak resident memory of one model is not
hidden by another's; runs of the two models alternate so that drift of the machine hits both.
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


def measure(impl: str, num_registers: int, batch_size: int, steps: int) -> dict:
    """Forward+backward images/s of one model in its fastest of ``steps`` steps (runs in the
    current process)."""
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = RegisterViT("vit_small", img_size=224, patch_size=16, num_registers=num_registers)
    if impl == "timm":
        model = create_timm_model(model)
    elif impl == "compiled":
        compile_blocks(model.blocks)
    x = torch.randn(batch_size, 3, 224, 224)
    baseline = _rss_bytes()

    def step():
        model(x).float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up, which compiles
    fastest = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - start)
    result = {"images_per_s": batch_size / fastest, "baseline_rss": baseline}
    if impl == "ours":
        result["library_share"] = library_share(step)
    return result


def _run_child(impl: str, num_registers: int, batch_size: int, steps: int) -> dict:
    code = (
        "import json; from lightning_registers.benchmarks.backbone import measure; "
        f"print(json.dumps(measure({impl!r}, {num_registers}, {batch_size}, {steps})))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"benchmark child for {impl} failed with status {status}")
    result = json.loads(out.strip().splitlines()[-1])
    result["step_memory_bytes"] = usage.ru_maxrss * 1024 - result.pop("baseline_rss")
    return result


def run(repeats: int = 4, batch_size: int = 32, steps: int = 3) -> list[str]:
    """Markdown lines for BENCHMARKS.md."""
    lines = [
        "| registers | ours img/s | timm img/s | compiled img/s | ours/timm speed "
        "| compiled/ours speed | ours step MiB | timm step MiB | compiled step MiB "
        "| ours/timm memory | matmul + attention share of ours' step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for num_registers in (0, 4):
        results = {impl: [] for impl in IMPLS}
        for repeat in range(repeats):
            # Rotate the order every repeat so that no model always runs first.
            shift = repeat % len(IMPLS)
            for impl in IMPLS[shift:] + IMPLS[:shift]:
                results[impl].append(_run_child(impl, num_registers, batch_size, steps))
        speed = {k: max(r["images_per_s"] for r in v) for k, v in results.items()}
        memory = {k: min(r["step_memory_bytes"] for r in v) / 2**20 for k, v in results.items()}
        share = sum(r["library_share"] for r in results["ours"]) / repeats
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
        f"vit_small, patch 16, 224 px, batch {batch_size}, float32 forward+backward on CPU; "
        f"the fastest step of {repeats} runs of {steps} steps each (after one warm-up step, "
        "which compiles; the fastest, as a shared machine only ever slows a step down), "
        "rotating the order of the three models; compiled is ours with each block compiled "
        "(`compile: true`); memory is the peak resident memory of the step above the model's own. "
        "The last column is the share of ours' operator time (torch.profiler, one step) in matrix "
        "products and fused attention, which a compiled block calls as eager does: compiling "
        "fuses only the rest (norms, GELU, residual adds, reshapes), so on a CPU in float32 it "
        "can gain at most 1 / (that share) and in practice gains a fraction of the rest.",
        "",
        *lines,
    ]

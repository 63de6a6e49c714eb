"""Monitoring cost: seconds of one TokenNormMonitor and one AttentionMapMonitor check (measure
and write to TensorBoard) against the demo model's training step, as a share of training time
at the default cadence and at the demo configs' cadence."""

from __future__ import annotations

import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from lightning_registers.callbacks import AttentionMapMonitor, TokenNormMonitor

from .data import demo_model, demo_step_seconds

DEMO_CADENCE = {"TokenNormMonitor": 20, "AttentionMapMonitor": 60}


def check_seconds(monitor, module, writer, repeats: int = 5) -> float:
    """Best of ``repeats`` checks at distinct steps (after a warm-up check)."""
    monitor.probe = torch.randn(monitor.probe_size, 3, 64, 64)
    monitor.run(module, 0, writer)
    best = float("inf")
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        monitor.run(module, step, writer)
        best = min(best, time.perf_counter() - start)
    return best


def run(batch_size: int = 128) -> list[str]:
    step = demo_step_seconds(batch_size)
    module = demo_model()
    monitors = [TokenNormMonitor(), AttentionMapMonitor()]
    lines = [
        "## Monitoring cost",
        "",
        "One check of each monitor with its default settings (probe of 16 images for norms, 4 "
        "for attention; every block and the output) on the demo model, written to a "
        f"TensorBoard file, against the demo model's float32 training step at batch {batch_size} "
        f"({step:.3f} s). Share of training time = check / (cadence x step).",
        "",
        "| monitor | check s | checks / step | default cadence | share at default | "
        "demo cadence | share in demo |",
        "|---|---|---|---|---|---|---|",
    ]
    total_default = total_demo = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        for monitor in monitors:
            name = type(monitor).__name__
            seconds = check_seconds(monitor, module, writer)
            default = seconds / (monitor.every_n_steps * step)
            demo = seconds / (DEMO_CADENCE[name] * step)
            total_default, total_demo = total_default + default, total_demo + demo
            lines.append(
                f"| {name} | {seconds:.3f} | {seconds / step:.2f} | {monitor.every_n_steps} | "
                f"{100 * default:.2f}% | {DEMO_CADENCE[name]} | {100 * demo:.2f}% |"
            )
        writer.close()
    lines.append(f"| both | | | | {100 * total_default:.2f}% | | {100 * total_demo:.2f}% |")
    return lines

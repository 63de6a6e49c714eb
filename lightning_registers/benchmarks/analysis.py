"""``analyze`` in bounded memory: peak resident memory of the full default analysis of a
ViT-S/14 at 224 px (random weights, written as an exported backbone) on generated scenes, for
a few image counts, each run in its own process (``ru_maxrss``), so that the counts compare.

Eight position embeddings of the random backbone are scaled up so that its residual stream has
high-norm tokens: the register-neuron search finds neurons and every pass of the analysis runs
(the third, with a test-time register, only runs where there are outliers)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lightning_registers.analysis import analyze, load_backbone
from lightning_registers.data.scenes import scene_sample
from lightning_registers.data.writers import write_shards
from lightning_registers.models import RegisterViT

from .backbone import _rss_bytes

COUNTS = (500, 5000)
SIZE = 224
HIGH_NORM_POSITIONS = 8  # position embeddings scaled up, so that outliers exist
BAR_BYTES = 3 * 2**30  # peak resident memory of the largest count at most
BAR_RATIO = 1.5  # largest count against the smallest, at most


def write_backbone(path: Path) -> None:
    """The random ViT-S/14 (4 registers) as ``lightning-registers export`` writes it."""
    torch.manual_seed(0)
    model = RegisterViT("vit_small", img_size=SIZE, patch_size=14, num_registers=4)
    with torch.no_grad():
        model.pos_embed[0, 1 : 1 + HIGH_NORM_POSITIONS] *= 1000
    torch.save({"config": model.config.as_kwargs(), "state_dict": model.state_dict()}, path)


def measure(images: str, checkpoint: str, count: int, out: str) -> dict:
    """The default analysis of ``checkpoint`` on the first ``count`` of ``images`` (runs in the
    current process, on one thread)."""
    torch.set_num_threads(1)
    loaded = load_backbone(checkpoint)
    before = _rss_bytes()
    start = time.perf_counter()
    summary = analyze([loaded], images, out, num_images=count, progress=False)
    model = next(iter(summary["models"].values()))
    return {
        "seconds": time.perf_counter() - start,
        "rss_before": before,
        "images": summary["images"]["count"],
        "register_neurons": len(model["test_time_registers"]["neurons"]),
    }


def _run_child(images: str, checkpoint: str, count: int, out: str) -> dict:
    args = ["--images", images, "--checkpoint", checkpoint, "--count", str(count), "--out", out]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_registers.benchmarks.analysis", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    printed = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"analyze benchmark on {count} images failed with status {status}")
    result = json.loads(printed.strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024
    return result


def run(counts: tuple[int, ...] = COUNTS) -> list[str]:
    """Markdown lines for BENCHMARKS.md."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        samples = (scene_sample(0, "val", i, SIZE) for i in range(max(counts)))
        write_shards(samples, root / "scenes", "scenes", maxcount=1000, progress=False)
        write_backbone(root / "backbone.pt")
        for count in counts:
            results[count] = _run_child(
                str(root / "scenes" / "scenes-*.tar"),
                str(root / "backbone.pt"),
                count,
                str(root / f"out{count}"),
            )
    mib = 2**20
    lines = [
        "| images | peak resident MiB | before the analysis MiB | seconds | register neurons |",
        "|---|---|---|---|---|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['images']} | {r['peak_rss'] / mib:.0f} | {r['rss_before'] / mib:.0f} "
            f"| {r['seconds']:.0f} | {r['register_neurons']} |"
        )
    low, high = results[min(counts)], results[max(counts)]
    ratio = high["peak_rss"] / low["peak_rss"]
    met = high["peak_rss"] < BAR_BYTES and ratio <= BAR_RATIO
    return [
        "## Analysis memory: `analyze` streams its images",
        "",
        f"The full default `analyze` (every measure, figures and summary, `--protocol ours`, "
        f"batch 32) of a random ViT-S/14 with 4 registers at {SIZE} px, written as an exported "
        f"backbone, {HIGH_NORM_POSITIONS} of its position embeddings scaled up so that there are "
        "high-norm tokens and all three passes run (the test-time register's included), on "
        f"generated scenes ({SIZE} px PNG shards); each count in its own process, on one "
        "thread; peak resident memory is the process's `ru_maxrss`.",
        "",
        *lines,
        "",
        f"Peak memory, {max(counts)} against {min(counts)} images: {ratio:.2f}x "
        f"(bar: under {BAR_BYTES / 2**30:.0f} GiB and at most {BAR_RATIO}x: "
        f"{'met' if met else 'NOT met'}).",
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="One analyze measurement (a child process).")
    for flag in ("--images", "--checkpoint", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--count", type=int, required=True)
    opts = parser.parse_args()
    print(json.dumps(measure(opts.images, opts.checkpoint, opts.count, opts.out)))

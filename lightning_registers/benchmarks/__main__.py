"""Run the CPU benchmark sections (`make bench`) or the GPU section (`... benchmarks gpu`) and
write BENCHMARKS.md with the command, machine and date; each replaces only its own part."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

import torch

from . import analysis, backbone, data, gpu, monitoring, scale

SECTIONS = {
    "backbone": backbone.run,
    "data": data.run,
    "monitoring": monitoring.run,
    "scale": scale.run,
    "analysis": analysis.run,
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
        cpu = names[0]
    python = platform.python_version()
    return f"{cpu}, {os.cpu_count()} cores, Python {python}, torch {torch.__version__}"


def split_gpu_section(text: str) -> tuple[str, str]:
    """``text`` of BENCHMARKS.md as (the CPU part, the GPU section); each run replaces its own."""
    at = text.find(gpu.NOT_MEASURED[0])
    return (text, "") if at < 0 else (text[:at], text[at:])


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "target",
        nargs="?",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu: the sections below on this machine (make bench); gpu: the GPU section "
        "(about 8 minutes on one GPU)",
    )
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args(argv)
    out = Path(args.out)
    cpu_part, gpu_part = split_gpu_section(out.read_text() if out.exists() else "")
    if args.target == "gpu":
        if not torch.cuda.is_available():
            parser.error("no CUDA device here: nothing measured, BENCHMARKS.md left as it is")
        gpu_part = "\n".join(gpu.run()) + "\n"
    else:
        command = " ".join(["python -m lightning_registers.benchmarks", *(argv or sys.argv[1:])])
        lines = [
            "# Benchmarks",
            "",
            f"Command: `{command}` (what `make bench` runs)",
            f"Machine: {machine()}",
            f"Date: {datetime.date.today().isoformat()}",
            "",
        ]
        for name in args.only:
            print(f"running benchmark section {name} ...", flush=True)
            lines += SECTIONS[name]() + [""]
        cpu_part = "\n".join(lines)
    text = cpu_part + (gpu_part or "\n".join(gpu.NOT_MEASURED) + "\n")
    write_atomically(out, text)
    print(text)


if __name__ == "__main__":
    main()

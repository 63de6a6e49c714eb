"""Run the CPU benchmark sections (`make bench`) or the GPU section (`... benchmarks gpu`) and
write them into BENCHMARKS.md, each with its date, machine and command; a run replaces only the
sections it measured."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch

from . import analysis, backbone, data, gpu, monitoring, scale

HEADER = (
    "# Benchmarks\n\n`make bench` runs `python -m lightning_registers.benchmarks`: every CPU "
    "section below (`--only NAME` reruns some and keeps the others); `python -m "
    "lightning_registers.benchmarks gpu` the GPU section at the end.\n\n"
)
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


def sections_of(text: str) -> dict[str, str]:
    """The ``## `` sections of ``text`` by heading, in order (what precedes the first is left
    out)."""
    sections: dict[str, str] = {}
    heading = None
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            heading = line.strip()
            sections[heading] = ""
        if heading is not None:
            sections[heading] += line
    return sections


def measured(lines: list[str], name: str) -> list[str]:
    """``lines`` of one benchmark with when, where and how each of its sections was measured
    written under the section's heading."""
    stamp = (
        f"Measured {datetime.date.today().isoformat()} on {machine()} by "
        f"`python -m lightning_registers.benchmarks --only {name}`."
    )
    out = []
    for line in lines:
        out.append(line)
        if line.startswith("## "):
            out += ["", stamp]
    return out


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
        sections = sections_of(cpu_part)
        for name in args.only:
            print(f"running benchmark section {name} ...", flush=True)
            sections.update(sections_of("\n".join(measured(SECTIONS[name](), name)) + "\n\n"))
        cpu_part = HEADER + "".join(sections.values())
    text = cpu_part + (gpu_part or "\n".join(gpu.NOT_MEASURED) + "\n")
    write_atomically(out, text)
    print(text)


if __name__ == "__main__":
    main()

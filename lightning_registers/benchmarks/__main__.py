"""Run every benchmark section and write BENCHMARKS.md with the command, machine and date."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

from . import analysis, backbone, data, monitoring, scale

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), default=list(SECTIONS))
    args = parser.parse_args()
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{' '.join(['python -m lightning_registers.benchmarks', *sys.argv[1:]])}` "
        "(what `make bench` runs)",
        f"Machine: {machine()}",
        f"Date: {datetime.date.today().isoformat()}",
        "",
    ]
    for name in args.only:
        print(f"running benchmark section {name} ...", flush=True)
        lines += SECTIONS[name]() + [""]
    text = "\n".join(lines)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

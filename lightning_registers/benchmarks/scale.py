"""Scale-out: per-rank bytes of parameters + optimizer state under FSDP2 against DDP on 2 gloo
processes (after a real AdamW step), and DDP training throughput of 2 processes against 1."""

from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from lightning_registers.cli import close_process_group
from lightning_registers.models import RegisterViT

ARCH = dict(arch="vit_small", img_size=64, patch_size=8, num_registers=4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    total = sum(_local_bytes(p) for p in model.parameters())
    for state in optimizer.state.values():
        total += sum(_local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def _worker(rank: int, world: int, port: int, mode: str, steps: int, batch: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = RegisterViT(**ARCH)
    model.mask_token.requires_grad_(False)  # unused without masks, as in the objectives
    if mode == "fsdp":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    elif world > 1:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 64, 64)

    def step():
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        torch.save({"bytes": _state_bytes(model, optimizer), "seconds": seconds}, out)
    close_process_group()


def measure(mode: str, world: int, steps: int = 3, batch: int = 32) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, _free_port(), mode, steps, batch, out), nprocs=world)
        result = torch.load(out, weights_only=True)
    result["samples_per_s"] = world * batch * steps / result["seconds"]
    return result


def run() -> list[str]:
    ddp, fsdp, single = measure("ddp", 2), measure("fsdp", 2), measure("ddp", 1)
    mib = 2**20
    return [
        "## Scale-out: FSDP2 against DDP, 2 processes against 1",
        "",
        f"RegisterViT {ARCH['arch']}, patch {ARCH['patch_size']}, {ARCH['img_size']} px, 4 "
        "registers, AdamW, float32 on CPU with gloo; 3 timed steps at batch 32 per process "
        "after one warm-up step. Memory: bytes this rank holds of parameters and optimizer "
        "state after a step (local shards under FSDP2).",
        "",
        "| setup | params + optimizer state per rank (MiB) | ratio to DDP | samples/s |",
        "|---|---|---|---|",
        f"| DDP, 2 processes | {ddp['bytes'] / mib:.1f} | 1.00 | {ddp['samples_per_s']:.1f} |",
        f"| FSDP2, 2 processes | {fsdp['bytes'] / mib:.1f} | {fsdp['bytes'] / ddp['bytes']:.2f} "
        f"| {fsdp['samples_per_s']:.1f} |",
        f"| 1 process | {single['bytes'] / mib:.1f} | | {single['samples_per_s']:.1f} |",
        "",
        "DDP throughput, 2 processes against 1: "
        f"{ddp['samples_per_s'] / single['samples_per_s']:.2f}x (both share the same CPU cores "
        "here; on GPUs each process has its own device).",
    ]

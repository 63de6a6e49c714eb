"""Monitoring under DDP (2 gloo processes through the CLI) and under FSDP2 (sharded backbone)."""

import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from demo_run import ROOT, demo_data, write_yaml
from ports import free_port
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.fsdp import fully_shard

from lightning_registers.callbacks import probing
from lightning_registers.cli import close_process_group
from lightning_registers.measures import prefix_attention, token_norms
from lightning_registers.measures.signature import probe_forward
from lightning_registers.models import RegisterViT


def backbone() -> RegisterViT:
    torch.manual_seed(0)
    return RegisterViT(
        "vit_tiny", img_size=32, patch_size=8, num_registers=2, embed_dim=32, depth=3, num_heads=2
    )


def _fsdp_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = backbone()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.train()
    with probing(model):
        norms = token_norms(model, images, [0, 1, 2])
        attention = prefix_attention(model, images)
        redundancy = probe_forward(model, images, [1])["redundancy"]
    # After probing the parameters are sharded again and training mode is back.
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    if rank == 0:
        torch.save(
            {
                "norms": norms,
                "attention": attention,
                "redundancy": redundancy,
                "sharded": sharded,
                "training": model.training,
            },
            out,
        )
    close_process_group()


def test_monitors_measure_an_fsdp2_sharded_backbone_like_the_whole_one(tmp_path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_fsdp_rank, args=(2, free_port(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    assert got["sharded"] and got["training"]
    reference = backbone().eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        norms = token_norms(reference, images, [0, 1, 2])
        attention = prefix_attention(reference, images)
        redundancy = probe_forward(reference, images, [1])["redundancy"]
    for layer, kinds in norms.items():
        for kind, value in kinds.items():
            torch.testing.assert_close(got["norms"][layer][kind], value)
    torch.testing.assert_close(got["attention"], attention)
    torch.testing.assert_close(got["redundancy"], redundancy)


def test_ddp_run_logs_monitoring_once_from_rank_zero(tmp_path, demo_shards):
    monitors = {
        "trainer": {
            "callbacks": [
                {
                    "class_path": "lightning_registers.callbacks.TokenNormMonitor",
                    "init_args": {"every_n_steps": 2, "probe_size": 6},
                },
                {
                    "class_path": "lightning_registers.callbacks.AttentionMapMonitor",
                    "init_args": {"every_n_steps": 2},
                },
                {"class_path": "lightning_registers.callbacks.ArtifactEmergence"},
            ],
        },
        "model": {
            "init_args": {
                "backbone": {
                    "init_args": {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8}
                }
            }
        },
        "data": demo_data(demo_shards, samples_per_epoch=64),
    }
    override = write_yaml(tmp_path / "ddp.yaml", monitors)
    command = [
        sys.executable,
        "-m",
        "lightning_registers.cli",
        "fit",
        "--config",
        str(ROOT / "configs/demo/supervised.yaml"),
        "--config",
        str(override),
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.max_steps=4",
        "--trainer.enable_progress_bar=false",
        "--experiment=ddp",
    ]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ddp" / "version_0"
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert not (tmp_path / "runs" / "ddp" / "version_1").exists()
    events = EventAccumulator(str(run), size_guidance={"histograms": 0, "images": 0, "scalars": 0})
    events.Reload()
    steps = [s.step for s in events.Scalars("artifacts/backbone/high_norm_share_relative/output")]
    assert steps == [0, 2, 4]
    assert [
        h.histogram_value.num for h in events.Histograms("token_norms/backbone/block01/patches")
    ] == [6 * 16] * 3
    assert len(events.Images("attention/backbone/mean")) == 3
    assert [s.value for s in events.Scalars("artifacts/backbone/present")] == [0, 0, 0]

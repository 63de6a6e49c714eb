"""DDP and FSDP2 across 2 gloo processes through the CLI; sharded checkpoints load, export and
resume, in float32 and in bf16 mixed precision; compiled blocks train as eager ones."""

import os
import subprocess
import sys

import pytest
import torch
from demo_run import ROOT, demo_data, write_yaml
from ports import free_port
from recorder import probe_images
from test_resume import losses

from lightning_registers.models import RegisterViT
from lightning_registers.objectives import load_objective
from lightning_registers.objectives.checkpoint import exported_backbone

TINY_MODEL = {
    "backbone": {"init_args": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
}
PER_OBJECTIVE = {
    "supervised": {},
    "clip": {"text_width": 32, "text_layers": 1, "text_heads": 2, "embed_dim": 32},
    "dino": {
        "local_crop_size": 16,
        "num_local_crops": 2,
        "n_prototypes": 64,
        "head_hidden_dim": 48,
        "head_bottleneck_dim": 16,
        "knn_train_samples": 32,
        "linear_probe_steps": 10,
    },
}


def run_cli(tmp_path, demo_shards, objective, strategy, *extra, precision="32-true", env=()):
    """``lightning-registers fit`` of the demo config, shrunk, on 2 CPU processes; the final
    backbone output goes to ``out.pt``, rank 0's losses to ``losses.txt``."""
    override = {
        "trainer": {"callbacks": [
            {"class_path": "recorder.RecordOutputs",
             "init_args": {"path": str(tmp_path / "out.pt")}},
            {"class_path": "recorder.RecordLosses",
             "init_args": {"path": str(tmp_path / "losses.txt")}},
        ]},
        "model": {"init_args": {**TINY_MODEL, **PER_OBJECTIVE[objective]}},
        "data": demo_data(demo_shards),
    }  # fmt: skip
    path = write_yaml(tmp_path / "override.yaml", override)
    fragment = {"ddp": [], "fsdp": ["--config", str(ROOT / "configs/trainer/fsdp.yaml")]}[strategy]
    command = [
        sys.executable, "-m", "lightning_registers.cli", "fit", *fragment,
        "--config", str(ROOT / f"configs/demo/{objective}.yaml"), "--config", str(path),
        "--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.precision={precision}",
        "--trainer.enable_progress_bar=false", "--experiment=run", *extra,
    ]  # fmt: skip
    if strategy == "ddp":
        command.append("--trainer.strategy=ddp")
    else:
        command.append("--trainer.strategy.init_args.process_group_backend=gloo")
    env = {
        **os.environ,
        **dict(env),
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=400, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path / "runs" / "run" / "version_0"


def test_clip_trains_under_two_process_ddp(tmp_path, demo_shards):
    run = run_cli(tmp_path, demo_shards, "clip", "ddp", "--trainer.max_epochs=1")
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2  # 16 samples over 2 ranks of batch 4
    module = load_objective(run / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        output = exported_backbone(module)(probe_images())
    torch.testing.assert_close(output, torch.load(tmp_path / "out.pt")["output"])


def checkpoint_entries(directory) -> set[str]:
    """Names in ``directory`` that are neither a checkpoint nor the directory a linked
    (sharded) checkpoint points to: leftovers of a write."""
    names = {p.name for p in directory.iterdir()}
    linked = {os.readlink(p) for p in directory.iterdir() if p.is_symlink()}
    return {n for n in names - linked if not n.endswith(".ckpt")}


@pytest.mark.parametrize(
    ("objective", "precision"),
    [("supervised", "32-true"), ("clip", "bf16-mixed"), ("dino", "32-true")],
)
def test_fsdp2_with_activation_checkpointing_saves_sharded_checkpoints_that_load_and_resume(
    objective, precision, tmp_path, demo_shards
):
    checkpointing = "--model.init_args.backbone.init_args.grad_checkpointing=true"
    fit = (tmp_path, demo_shards, objective, "fsdp", checkpointing)
    run = run_cli(*fit, "--trainer.max_epochs=2", precision=precision)
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard a rank
    assert last.is_symlink()  # to the directory it was written in, published by one rename
    assert len(list(last.parent.glob("best-*.ckpt"))) == 1  # validation gave the metric
    recorded = torch.load(tmp_path / "out.pt")["output"]

    module = load_objective(last)  # one process, no process group
    with torch.no_grad():
        torch.testing.assert_close(exported_backbone(module)(probe_images()), recorded)

    exported = tmp_path / "backbone.pt"
    subprocess.run(
        [sys.executable, "-m", "lightning_registers.cli", "export", str(last),
         "--out", str(exported)],
        check=True, capture_output=True,
    )  # fmt: skip
    saved = torch.load(exported, weights_only=True)
    backbone = RegisterViT(**saved["config"]).eval()
    backbone.load_state_dict(saved["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(backbone(probe_images()), recorded)

    meta = torch.load(last / "meta.pt", weights_only=True)
    assert meta["global_step"] == 4
    run_cli(*fit, "--trainer.max_epochs=3", f"--ckpt_path={last}", precision=precision)
    resumed = torch.load(last / "meta.pt", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["epoch"] == 2  # continued, not restarted
    assert checkpoint_entries(last.parent) == set()  # replaced directories deleted


@pytest.mark.parametrize(
    ("objective", "strategy", "extra"),
    [
        ("supervised", "ddp", ()),
        ("supervised", "fsdp", ("--model.init_args.backbone.init_args.grad_checkpointing=true",)),
    ],
)
def test_compiled_blocks_train_as_eager_ones_under_ddp_and_fsdp2(
    objective, strategy, extra, tmp_path, demo_shards
):
    results = {}
    for compiled in (False, True):
        where = tmp_path / f"compile_{compiled}"
        where.mkdir()
        kernels = where / "inductor"
        run_cli(where, demo_shards, objective, strategy, *extra, "--trainer.max_epochs=1",
                f"--model.init_args.compile={compiled}",
                env={"TORCHINDUCTOR_CACHE_DIR": str(kernels)})  # fmt: skip
        generated = [p for p in kernels.rglob("*.py") if p.is_file()]
        assert bool(generated) == compiled  # inductor wrote kernels only when asked to
        results[compiled] = losses(where / "losses.txt"), torch.load(where / "out.pt")
    (eager_losses, eager), (compiled_losses, compiled) = results[False], results[True]
    assert sorted(eager_losses) == sorted(compiled_losses) == [1, 2]
    for step, loss in eager_losses.items():
        assert compiled_losses[step] == pytest.approx(loss, rel=1e-4)
    torch.testing.assert_close(compiled["output"], eager["output"], rtol=1e-4, atol=1e-4)

"""Exact resume: a run killed with SIGKILL and resumed with --ckpt_path last continues the loss
trajectory of an uninterrupted run (data order, augmentations, Mixup and drop-path included)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from demo_run import ROOT, demo_data, write_yaml


def fit(work: Path, demo_shards, callbacks: list[dict], *extra) -> subprocess.CompletedProcess:
    override = {
        "trainer": {"callbacks": callbacks, "max_epochs": 3},
        "model": {"init_args": {
            "backbone": {"init_args": {"embed_dim": 32, "depth": 2, "num_heads": 2,
                                       "drop_path_rate": 0.2}},
            "mixup_alpha": 0.8, "cutmix_alpha": 1.0,
        }},
        "data": demo_data(demo_shards, num_workers=1),
    }  # fmt: skip
    path = write_yaml(work / "override.yaml", override)
    command = [
        sys.executable, "-m", "lightning_registers.cli", "fit",
        "--config", str(ROOT / "configs/demo/supervised.yaml"), "--config", str(path),
        "--trainer.enable_progress_bar=false", "--experiment=resume", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300, env=env)


def losses(path: Path) -> dict[int, float]:
    return {int(s): float(v) for s, v in (line.split() for line in path.read_text().splitlines())}


def recorder(path: Path) -> dict:
    return {"class_path": "recorder.RecordLosses", "init_args": {"path": str(path)}}


@pytest.mark.parametrize("kill_at", [10])
def test_sigkilled_run_resumes_with_the_uninterrupted_loss_trajectory(
    kill_at, tmp_path, demo_shards
):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    straight.mkdir(), crashed.mkdir()
    done = fit(straight, demo_shards, [recorder(straight / "losses.txt")])
    assert done.returncode == 0, done.stderr[-3000:]
    reference = losses(straight / "losses.txt")
    assert sorted(reference) == list(range(1, 13))  # 3 epochs of 4 steps

    killed = fit(
        crashed, demo_shards,
        [recorder(crashed / "before.txt"), {"class_path": "recorder.KillAt",
                                            "init_args": {"step": kill_at}}],
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    before = losses(crashed / "before.txt")
    assert max(before) == kill_at

    resumed = fit(crashed, demo_shards, [recorder(crashed / "after.txt")], "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = losses(crashed / "after.txt")
    assert sorted(after) == list(range(9, 13))  # from the end of epoch 2, the last checkpoint
    assert not (crashed / "runs" / "resume" / "version_1").exists()  # same run directory
    for step in range(1, 13):
        value = after.get(step, before.get(step))
        assert value == pytest.approx(reference[step], rel=1e-6), step

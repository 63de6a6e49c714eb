"""Checkpoints are written atomically beside their path: a process SIGKILLed at any moment of a
write (file or sharded directory) leaves the previous or the new checkpoint, whole, and its
leftovers are removed when the next fit starts; a real fit killed while saving, with the system
temp directory on another filesystem, resumes from its last.ckpt."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from demo_run import ROOT, demo_data, write_yaml
from test_resume import losses

from lightning_registers.objectives.checkpoint_io import (
    TEMP_PREFIX,
    AtomicCheckpointIO,
    publish_directory,
    remove_checkpoint,
    remove_leftovers,
    temp_path,
)

KILLS = 16
WEIGHTS = [torch.zeros(6_000_000), torch.ones(6_000_000)]


def temp_entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)}


def kill_while_writing(write, directory: Path, offset: float) -> bool:
    """Run ``write`` in a forked process, SIGKILL it ``offset`` seconds after its first
    temporary entry appears in ``directory``; True when the kill left a leftover (it landed
    before the write was published). ``write`` must not start threads: OpenMP does not survive
    a fork, so tensors are made before."""
    before = temp_entries(directory)
    child = multiprocessing.get_context("fork").Process(target=write)
    child.start()
    deadline = time.monotonic() + 30
    while not temp_entries(directory) - before and child.is_alive():
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.0002)
    time.sleep(offset)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    return any((directory / name).exists() for name in temp_entries(directory) - before)


def duration(write) -> float:
    start = time.perf_counter()
    write()
    return time.perf_counter() - start


def checkpoint(generation: int) -> dict:
    """About 24 MB: zeros for generation 0, ones for the others."""
    return {"generation": generation, "state_dict": {"w": WEIGHTS[min(generation, 1)]}}


def test_a_file_checkpoint_killed_at_any_point_of_its_write_is_the_old_or_the_new_one(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TMPDIR", "/dev/shm")  # what Lightning writes through; not used here
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(0), path)
    seconds = duration(lambda: io.save_checkpoint(checkpoint(0), path))
    landed = 0
    for kill in range(KILLS):
        new = kill + 1
        offset = 2 * seconds * kill / KILLS  # from the write's start to past its end
        landed += kill_while_writing(
            partial(io.save_checkpoint, checkpoint(new), path), tmp_path, offset
        )
        saved = torch.load(path, weights_only=True)
        assert saved["generation"] in (0, new)
        assert torch.equal(
            saved["state_dict"]["w"], checkpoint(saved["generation"])["state_dict"]["w"]
        )
        if saved["generation"]:  # published: the next kill interrupts a replacement of 0
            io.save_checkpoint(checkpoint(0), path)
    assert landed >= KILLS // 4  # some kills interrupted the write
    assert remove_leftovers(tmp_path) and temp_entries(tmp_path) == set()
    assert torch.load(path, weights_only=True)["generation"] == 0


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / "hpc_ckpt_1.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises(AttributeError):  # a lambda does not pickle
        io.save_checkpoint({"step": 2, "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert temp_entries(tmp_path) == set()


def write_sharded(directory: Path, path: Path, generation: int) -> None:
    """What a sharded save does: every rank's file into a staged directory, then publish."""
    staged = temp_path(directory)
    staged.mkdir()
    for rank in range(4):
        (staged / f"__{rank}_0.distcp").write_bytes(bytes([generation]) * 4_000_000)
    (staged / "meta.pt").write_bytes(bytes([generation]))
    publish_directory(staged, path)


def sharded_generation(path: Path) -> int:
    """The generation of the complete sharded checkpoint at ``path`` (fails if it is not one)."""
    files = sorted(p.name for p in path.iterdir())
    assert files == [*(f"__{rank}_0.distcp" for rank in range(4)), "meta.pt"]
    generation = (path / "meta.pt").read_bytes()[0]
    for rank in range(4):
        assert (path / f"__{rank}_0.distcp").read_bytes() == bytes([generation]) * 4_000_000
    return generation


def test_a_sharded_checkpoint_killed_at_any_point_of_its_replacement_is_the_old_or_the_new_one(
    tmp_path,
):
    path = tmp_path / "last.ckpt"
    write_sharded(tmp_path, path, 0)
    assert path.is_symlink() and sharded_generation(path) == 0
    seconds = duration(lambda: write_sharded(tmp_path, path, 0))
    landed = 0
    for kill in range(KILLS):
        generation = kill + 1
        offset = 2 * seconds * kill / KILLS
        landed += kill_while_writing(
            partial(write_sharded, tmp_path, path, generation), tmp_path, offset
        )
        assert sharded_generation(path) in (0, generation)
        if sharded_generation(path):
            write_sharded(tmp_path, path, 0)
    assert landed >= KILLS // 4  # some kills interrupted the write
    remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", os.readlink(path)])
    assert sharded_generation(path) == 0


def test_publishing_replaces_a_plain_directory_and_removal_takes_the_linked_one(tmp_path):
    path = tmp_path / "best.ckpt"
    path.mkdir()
    (path / "meta.pt").write_bytes(b"plain")
    write_sharded(tmp_path, path, 7)
    assert sharded_generation(path) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best.ckpt", os.readlink(path)])
    remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


def start_fit(work: Path, demo_shards, *extra) -> subprocess.Popen:
    """A supervised fit of the demo's ViT (23 MB checkpoints) saving every step (one step an
    epoch), with the system temp directory on another filesystem than its run directory."""
    override = {
        "trainer": {
            "callbacks": [{"class_path": "recorder.RecordLosses",
                           "init_args": {"path": str(work / "losses.txt")}}],
            "max_epochs": 4, "limit_val_batches": 1, "log_every_n_steps": 1,
        },
        "data": demo_data(demo_shards, samples_per_epoch=4),
    }  # fmt: skip
    command = [
        sys.executable, "-m", "lightning_registers.cli", "fit",
        "--config", str(ROOT / "configs/demo/supervised.yaml"),
        "--config", str(write_yaml(work / "override.yaml", override)),
        "--trainer.enable_progress_bar=false", "--experiment=atomic", *extra,
    ]  # fmt: skip
    env = {**os.environ, "TMPDIR": "/dev/shm", "PYTHONPATH": str(ROOT / "tests")}
    with open(work / "stderr.txt", "w") as stderr:
        return subprocess.Popen(
            command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )


def stderr_tail(work: Path) -> str:
    return (work / "stderr.txt").read_text()[-3000:]


def test_a_fit_killed_while_saving_resumes_from_its_last_checkpoint(tmp_path, demo_shards):
    checkpoints = tmp_path / "runs" / "atomic" / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    killed = start_fit(tmp_path, demo_shards)
    # Once last.ckpt exists, kill the fit 2 ms into its next checkpoint write.
    seen, deadline = set(), time.monotonic() + 240
    while not (last.exists() and temp_entries(checkpoints) - seen):
        assert killed.poll() is None, stderr_tail(tmp_path)
        assert time.monotonic() < deadline
        if not last.exists() and checkpoints.is_dir():
            seen = temp_entries(checkpoints)
        time.sleep(0.0002)
    time.sleep(0.002)
    killed.kill()
    killed.wait()
    leftovers = temp_entries(checkpoints)
    assert leftovers  # the kill interrupted a write
    saved = torch.load(last, weights_only=True)
    steps = losses(tmp_path / "losses.txt")
    assert saved["global_step"] in (max(steps), max(steps) - 1)
    (tmp_path / "losses.txt").unlink()

    resumed = start_fit(tmp_path, demo_shards, "--ckpt_path=last")
    assert resumed.wait(timeout=300) == 0, stderr_tail(tmp_path)
    assert min(losses(tmp_path / "losses.txt")) == saved["global_step"] + 1
    assert temp_entries(checkpoints) == set()  # the killed run's leftovers, removed at start
    assert torch.load(last, weights_only=True)["global_step"] == 4

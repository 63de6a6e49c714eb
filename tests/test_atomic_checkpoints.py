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
WEIGHTS = [torch.zeros(3_000_000), torch.ones(3_000_000)]


def temp_entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX)}


def written(entry: Path) -> int:
    """Bytes in a temporary file or in the files of a staged directory (links, and entries
    published meanwhile, count nothing)."""
    try:
        if entry.is_symlink():
            return 0
        if entry.is_dir():
            return sum(f.stat().st_size for f in entry.iterdir())
        return entry.stat().st_size
    except FileNotFoundError:
        return 0


def kill_after(write, directory: Path, nbytes: float) -> bool:
    """Run ``write`` in a forked process and SIGKILL it once its temporary entries in
    ``directory`` hold ``nbytes``; True when the kill left a leftover (it landed before the
    write was published). ``write`` must not start threads (OpenMP does not survive a fork),
    so tensors are made before."""
    before = temp_entries(directory)
    child = multiprocessing.get_context("fork").Process(target=write)
    child.start()
    deadline = time.monotonic() + 30
    while child.is_alive():
        new = [directory / name for name in temp_entries(directory) - before]
        if new and sum(written(entry) for entry in new) >= nbytes:
            break
        assert time.monotonic() < deadline, "the write never got there"
        time.sleep(0.0002)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    return any((directory / name).exists() for name in temp_entries(directory) - before)


def checkpoint(generation: int) -> dict:
    """About 12 MB: zeros for generation 0, ones for the others."""
    return {"generation": generation, "state_dict": {"w": WEIGHTS[min(generation, 1)]}}


def test_a_file_checkpoint_killed_at_any_point_of_its_write_is_the_old_or_the_new_one(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TMPDIR", "/dev/shm")  # what Lightning writes through; not used here
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(0), path)
    size = path.stat().st_size
    landed = 0
    for kill in range(KILLS):
        new = kill + 1
        at = size * kill / (KILLS - 1)  # from the first byte to past the last one
        landed += kill_after(partial(io.save_checkpoint, checkpoint(new), path), tmp_path, at)
        saved = torch.load(path, weights_only=True)
        assert saved["generation"] in (0, new)
        assert torch.equal(
            saved["state_dict"]["w"], checkpoint(saved["generation"])["state_dict"]["w"]
        )
        if saved["generation"]:  # published: the next kill interrupts a replacement of 0
            io.save_checkpoint(checkpoint(0), path)
    assert landed >= KILLS // 2  # most kills interrupted the write
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
        (staged / f"__{rank}_0.distcp").write_bytes(bytes([generation]) * 2_000_000)
    (staged / "meta.pt").write_bytes(bytes([generation]))
    publish_directory(staged, path)


def sharded_generation(path: Path) -> int:
    """The generation of the complete sharded checkpoint at ``path`` (fails if it is not one)."""
    files = sorted(p.name for p in path.iterdir())
    assert files == [*(f"__{rank}_0.distcp" for rank in range(4)), "meta.pt"]
    generation = (path / "meta.pt").read_bytes()[0]
    for rank in range(4):
        assert (path / f"__{rank}_0.distcp").read_bytes() == bytes([generation]) * 2_000_000
    return generation


def test_a_sharded_checkpoint_killed_at_any_point_of_its_replacement_is_the_old_or_the_new_one(
    tmp_path,
):
    path = tmp_path / "last.ckpt"
    write_sharded(tmp_path, path, 0)
    assert path.is_symlink() and sharded_generation(path) == 0
    size = written(path.resolve())
    landed = 0
    for kill in range(KILLS):
        generation = kill + 1
        at = size * kill / (KILLS - 1)
        landed += kill_after(partial(write_sharded, tmp_path, path, generation), tmp_path, at)
        assert sharded_generation(path) in (0, generation)
        if sharded_generation(path):
            write_sharded(tmp_path, path, 0)
    assert landed >= KILLS // 2  # most kills interrupted the write
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


def test_leftovers_are_the_temporary_entries_that_no_checkpoint_links_to(tmp_path):
    path = tmp_path / "last.ckpt"
    write_sharded(tmp_path, path, 1)
    staged, link, half = (temp_path(tmp_path) for _ in range(3))
    staged.mkdir()
    os.symlink(staged.name, link)  # a publish killed before its rename
    half.write_bytes(b"half a file")
    assert sorted(remove_leftovers(tmp_path)) == sorted([staged, link, half])
    assert sharded_generation(path) == 1 and len(list(tmp_path.iterdir())) == 2


def start_fit(work: Path, demo_shards, *extra) -> subprocess.Popen:
    """A supervised fit of the demo's ViT (23 MB checkpoints) saving every step (one step an
    epoch), with the system temp directory on another filesystem than its run directory."""
    override = {
        "trainer": {
            "callbacks": [{"class_path": "recorder.RecordLosses",
                           "init_args": {"path": str(work / "losses.txt")}}],
            "max_epochs": 4, "limit_val_batches": 2, "log_every_n_steps": 1,
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
    # Once last.ckpt exists, kill the fit half-way through its next checkpoint write.
    seen, deadline = set(), time.monotonic() + 240
    while True:
        assert killed.poll() is None, stderr_tail(tmp_path)
        assert time.monotonic() < deadline
        if not last.exists():
            seen = temp_entries(checkpoints) if checkpoints.is_dir() else set()
        else:
            new = [checkpoints / name for name in temp_entries(checkpoints) - seen]
            if new and sum(written(entry) for entry in new) >= last.stat().st_size / 2:
                break
        time.sleep(0.0002)
    killed.kill()
    killed.wait()
    assert temp_entries(checkpoints)  # the kill interrupted a write
    saved = torch.load(last, weights_only=True)
    steps = losses(tmp_path / "losses.txt")
    assert saved["global_step"] in (max(steps), max(steps) - 1)
    (tmp_path / "losses.txt").unlink()

    resumed = start_fit(tmp_path, demo_shards, "--ckpt_path=last")
    assert resumed.wait(timeout=300) == 0, stderr_tail(tmp_path)
    assert min(losses(tmp_path / "losses.txt")) == saved["global_step"] + 1
    assert temp_entries(checkpoints) == set()  # the killed run's leftovers, removed at start
    assert torch.load(last, weights_only=True)["global_step"] == 4

"""Which checkpoint ``--ckpt_path last`` resumes: the newest run that has a checkpoint, and in
it the newest checkpoint that loads."""

import os

import pytest
import torch

from lightning_registers.objectives.safe_load import UnreadableCheckpointError, read_checkpoint
from lightning_registers.runs import resume_checkpoint, run_dir


def write(path, step: int | None, age: float):
    """A checkpoint holding ``step`` (None: an empty file), modified ``age`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if step is None:
        path.touch()
    else:
        torch.save({"global_step": step}, path)
    when = 1_000_000 - age
    os.utime(path, (when, when))
    return path


def resume(version=None):
    """(version, path, global step) of what ``last`` resumes in experiment "exp", or None."""
    found = resume_checkpoint("exp", version, read_checkpoint)
    return found and (found[0], found[1], found[2]["global_step"])


def test_the_newest_run_with_a_checkpoint_is_resumed_not_a_newer_empty_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(run_dir("exp", 0) / "checkpoints" / "last.ckpt", 10, age=50)
    write(run_dir("exp", 1) / "checkpoints" / "last.ckpt", 20, age=40)
    run_dir("exp", 2).mkdir()  # what a dry run leaves: a script, no checkpoint
    (run_dir("exp", 2) / "submit.sbatch").write_text("#!/bin/bash\n")
    assert resume() == (1, run_dir("exp", 1) / "checkpoints" / "last.ckpt", 20)
    # A given version (a requeued Slurm job passes its own) is the one searched.
    assert resume(version=0) == (0, run_dir("exp", 0) / "checkpoints" / "last.ckpt", 10)
    assert resume(version=2) is None


def test_the_newest_checkpoint_that_loads_is_taken_and_each_skipped_one_named(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    run = run_dir("exp", 0)
    empty = write(run / "hpc_ckpt_2.ckpt", None, age=1)
    cut = write(run / "hpc_ckpt_1.ckpt", 30, age=2)
    cut.write_bytes(cut.read_bytes()[:100])
    os.utime(cut, (1_000_000 - 2,) * 2)
    last = write(run / "checkpoints" / "last.ckpt", 25, age=3)
    write(run / "checkpoints" / "best-1-20.ckpt", 20, age=4)
    with pytest.warns(UserWarning) as warned:
        assert resume() == (0, last, 25)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2
    for skipped, reason in ((empty, "empty"), (cut, "truncated")):
        (message,) = [m for m in messages if str(skipped) in m]
        assert reason in message and message.endswith(f"resuming from {last} instead")


def test_no_checkpoint_anywhere_starts_a_new_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resume() is None
    run_dir("exp", 0).mkdir(parents=True)
    assert resume() is None


def test_a_run_whose_checkpoints_all_fail_is_one_error_naming_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = run_dir("exp", 3)
    write(run / "hpc_ckpt_1.ckpt", None, age=1)
    write(run / "checkpoints" / "last.ckpt", None, age=2)
    write(run_dir("exp", 1) / "checkpoints" / "last.ckpt", 5, age=9)  # an older run: not taken
    with pytest.raises(UnreadableCheckpointError) as failed:
        resume()
    message = str(failed.value)
    assert "\n" not in message and f"no checkpoint of {run} loads" in message
    assert "hpc_ckpt_1.ckpt is empty" in message and "last.ckpt is empty" in message

"""Checkpoints load without running code: a pickle that would run code is refused with one line
naming the file and the option that trusts it, and the code does not run; broken files are
named; sharded checkpoints are checked before PyTorch's distributed checkpoint reads them."""

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_registers.objectives import load_objective
from lightning_registers.objectives.safe_load import (
    UnreadableCheckpointError,
    UntrustedCheckpointError,
    read_checkpoint,
)


class WritesAFile:
    """Unpickling this opens ``path`` for writing: the file appears only if the pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": WritesAFile(marker)}, path)

    with pytest.raises(UntrustedCheckpointError) as refused:
        read_checkpoint(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "--trust-checkpoint" in message
    assert "trusted=True" in message and "open" in message  # names what it would call
    assert not marker.exists()

    read_checkpoint(path, trusted=True)  # the user's explicit choice: the pickle does run
    assert marker.exists()


def test_a_plain_pickle_is_refused_too(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"x": WritesAFile(marker)}))
    with pytest.raises(UntrustedCheckpointError, match="weights.pkl"):
        read_checkpoint(path)
    assert not marker.exists()


def test_tensors_and_plain_data_load_in_both_torch_formats(tmp_path):
    data = {"w": torch.arange(4.0), "meta": {"name": "x", "sizes": [1, 2], "lr": 0.1}}
    for zipped in (True, False):
        path = tmp_path / f"plain_{zipped}.pt"
        torch.save(data, path, _use_new_zipfile_serialization=zipped)
        loaded = read_checkpoint(path)
        assert loaded["meta"] == data["meta"]
        torch.testing.assert_close(loaded["w"], data["w"])


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "is empty (0 bytes)"),
        (b"not a checkpoint at all", "does not load with weights_only=True"),
        ("half", "truncated or not a PyTorch file"),
    ],
    ids=["empty", "garbage", "truncated"],
)
def test_broken_files_fail_with_one_line_naming_them(tmp_path, content, expected):
    path = tmp_path / "broken.ckpt"
    if content == "half":
        torch.save({"w": torch.randn(1000)}, tmp_path / "whole.ckpt")
        whole = (tmp_path / "whole.ckpt").read_bytes()
        content = whole[: len(whole) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError) as failed:
        read_checkpoint(path)
    assert expected in str(failed.value) and str(path) in str(failed.value)
    assert "\n" not in str(failed.value)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_checkpoint(tmp_path / "missing.ckpt")


def sharded(tmp_path, name: str, state: dict):
    """A directory as our FSDP2 checkpoints are: the distributed checkpoint plus meta.pt."""
    path = tmp_path / name
    dcp.save(state, checkpoint_id=path)
    torch.save({"hyper_parameters": {}, "global_step": 3}, path / "meta.pt")
    return path


def test_a_clean_sharded_checkpoint_reads_its_meta_file(tmp_path):
    path = sharded(tmp_path, "clean", {"w": torch.ones(3), "opt": {"lr": 0.1, "betas": (0.9, 1)}})
    assert read_checkpoint(path)["global_step"] == 3


def test_a_sharded_checkpoint_with_code_in_an_entry_is_refused(tmp_path):
    marker = tmp_path / "ran"
    # DCP pickles non-tensor entries and reads them back with weights_only=False.
    path = sharded(tmp_path, "entry", {"w": torch.ones(3), "opt": {"x": WritesAFile(marker)}})
    with pytest.raises(UntrustedCheckpointError, match="open"):
        read_checkpoint(path)
    assert not marker.exists()


def test_a_sharded_checkpoint_with_code_in_its_metadata_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = sharded(tmp_path, "metadata", {"w": torch.ones(3)})
    # DCP reads .metadata with a plain pickle.load.
    (path / ".metadata").write_bytes(pickle.dumps(WritesAFile(marker)))
    with pytest.raises(UntrustedCheckpointError, match=r"\.metadata"):
        load_objective(path)
    assert not marker.exists()


def test_a_sharded_directory_without_its_metadata_is_named(tmp_path):
    path = sharded(tmp_path, "partial", {"w": torch.ones(3)})
    (path / ".metadata").unlink()
    with pytest.raises(UnreadableCheckpointError, match="partial has no .metadata"):
        read_checkpoint(path)


def test_a_checkpoint_naming_a_callable_other_than_an_objective_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.ckpt"
    # Plain data, but it names a class to build from its hyperparameters.
    hparams = {"_class_path": "builtins.open", "file": str(marker), "mode": "w"}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="builtins.open, which is not an objective"):
        load_objective(path)
    assert not marker.exists()

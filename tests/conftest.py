"""Shared fixtures: tiny demo shards written once per test session."""

import os

import pytest
import torch.distributed as dist

from lightning_registers.data import write_demo_shards


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """400 train and 100 val scenes at 32 px, 50 samples a shard; returns the root folder."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_shards(root, train=400, val=100, size=32, seed=0, maxcount=50, progress=False)
    return root


@pytest.fixture(autouse=True)
def isolated_process_state():
    """Undo what an in-process run leaves behind: environment variables (a leftover LOCAL_RANK
    or WORLD_SIZE makes a later CLI subprocess believe it is an already-launched rank) and an
    open process group."""
    saved = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)

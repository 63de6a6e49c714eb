"""Shared fixtures: tiny demo shards written once per test session."""

import pytest

from lightning_registers.data import write_demo_shards


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """400 train and 100 val scenes at 32 px, 50 samples a shard; returns the root folder."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_shards(root, train=400, val=100, size=32, seed=0, maxcount=50, progress=False)
    return root

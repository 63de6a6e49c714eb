"""The training and validation streams: splitting, determinism, epoch length, bad data."""

import io
import shutil
import tarfile
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_registers.data import ShardDataModule, ShardStream, expand_urls, skipped_in_batch
from lightning_registers.data.samples import decode_label


def key_and_url(sample):
    return {"key": sample["__key__"], "url": sample["__url__"], "label": decode_label(sample)}


def train_pattern(root):
    return str(root / "train" / "demo-train-{000000..000007}.tar")


def collect(dataset, num_workers, batch_size=10):
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    keys, urls, skipped = [], set(), 0
    for batch in loader:
        keys += batch["key"]
        urls |= set(batch["url"])
        skipped += skipped_in_batch(batch)
    return keys, urls, skipped


def test_two_ranks_by_two_workers_see_disjoint_shards(demo_shards, monkeypatch):
    urls = expand_urls(train_pattern(demo_shards))
    seen = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = ShardStream(urls, key_and_url, train=True, samples_per_epoch=160, batch_size=10)
        keys, shards, _ = collect(stream, num_workers=2)
        assert len(keys) == 80  # half the epoch on each rank, in whole batches
        seen[rank] = (set(keys), shards)
    assert not seen[0][0] & seen[1][0]
    assert not seen[0][1] & seen[1][1]


def test_fewer_shards_than_slots_still_split_samples_disjointly(demo_shards, monkeypatch):
    url = [str(demo_shards / "val" / "demo-val-000000.tar")]
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys, _, _ = collect(ShardStream(url, key_and_url, train=False), num_workers=2)
        seen.append(set(keys))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 50


def test_training_stream_is_deterministic_and_reshuffles_each_epoch(demo_shards):
    urls = expand_urls(train_pattern(demo_shards))

    def epochs(n):
        stream = ShardStream(
            urls,
            key_and_url,
            train=True,
            samples_per_epoch=100,
            batch_size=10,
            seed=5,
            shuffle_buffer=50,
        )
        return [collect(stream, num_workers=0)[0] for _ in range(n)]

    first, second = epochs(2)
    assert len(first) == 100 and first != second
    assert epochs(2) == [first, second]
    resumed = ShardStream(
        urls,
        key_and_url,
        train=True,
        samples_per_epoch=100,
        batch_size=10,
        seed=5,
        shuffle_buffer=50,
        start_epoch=1,
    )
    assert collect(resumed, num_workers=0)[0] == second


def test_validation_stream_reads_every_sample_once_in_order(demo_shards):
    keys, _, _ = collect(
        ShardStream(expand_urls(str(demo_shards / "val" / "*.tar")), key_and_url, train=False),
        num_workers=0,
    )
    assert keys == [f"val-{i:08d}" for i in range(100)]


def test_corrupted_shard_and_undecodable_sample_are_skipped_and_counted(demo_shards, tmp_path):
    src = demo_shards / "val"
    shutil.copy(src / "demo-val-000000.tar", tmp_path / "good.tar")
    with tarfile.open(src / "demo-val-000001.tar") as tar:
        middle = [m for m in tar.getmembers() if m.name.endswith(".png")][25]
    cut = middle.offset_data + middle.size // 2  # inside an image, as an interrupted copy
    data = (src / "demo-val-000001.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[:cut])
    (tmp_path / "garbage.tar").write_bytes(b"\x00garbage" * 100)

    def decode_or_fail(sample):
        if sample["__key__"] == "val-00000003":
            raise ValueError("cannot decode image")
        from PIL import Image

        Image.open(io.BytesIO(sample["png"])).load()
        return key_and_url(sample)

    urls = [str(tmp_path / n) for n in ("good.tar", "truncated.tar", "garbage.tar")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys, _, skipped = collect(ShardStream(urls, decode_or_fail, train=False), 0)
    # The readable head of the truncated shard arrives, up to the sample cut in its image.
    assert keys == [f"val-{i:08d}" for i in range(75) if i != 3]
    assert skipped == 3  # the sample, the rest of the truncated shard, the garbage shard
    messages = " ".join(str(w.message) for w in caught)
    assert "val-00000003" in messages and "good.tar" in messages
    assert "garbage.tar" in messages and "truncated.tar" in messages


def test_pattern_matching_no_file_fails_at_once_naming_it(tmp_path):
    pattern = str(tmp_path / "nothing-{000..009}.tar")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        ShardDataModule(train_urls=pattern)
    (tmp_path / "nothing-000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="9 of 10 shards do not exist"):
        expand_urls(pattern)


def test_datamodule_builds_loaders_with_a_given_transform(demo_shards):
    dm = ShardDataModule(
        train_pattern(demo_shards),
        str(demo_shards / "val" / "*.tar"),
        batch_size=8,
        num_workers=0,
        samples_per_epoch=32,
    )
    batches = list(dm.train_dataloader(transform=key_and_url))
    assert len(batches) == 4 and all(len(b["key"]) == 8 for b in batches)
    assert isinstance(batches[0]["label"], torch.Tensor)
    assert dm.class_names[0] == "red circle"
    val = list(dm.val_dataloader(transform=key_and_url))
    assert sum(len(b["key"]) for b in val) == 100
    with pytest.raises(RuntimeError, match="make_transform"):
        dm.train_dataloader()

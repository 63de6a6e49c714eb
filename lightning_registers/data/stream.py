"""Streams of webdataset samples: split by rank and worker, deterministic, robust to bad data.

Every (rank, worker) slot reads its own fixed share of the shards; with fewer shards than
slots, all slots read every shard and keep every slots-th sample, so slots never see the same
sample. Training streams repeat forever (each pass reshuffles the slot's shards from the seed,
epoch and pass, and a buffer shuffles samples) and each epoch takes a fixed number of samples.
Validation streams are read once, split the same way.

Everything random in a training epoch (order and augmentations) is a function of the seed, the
epoch and the slot, never of what ran before: a run resumed at an epoch boundary sees exactly
the data of an uninterrupted one, whatever the number of workers and whether they persist.
"""

from __future__ import annotations

import glob
import itertools
import multiprocessing
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from braceexpand import braceexpand
from torch.utils.data import IterableDataset
from webdataset.utils import pytorch_worker_info

Transform = Callable[[dict], dict]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Brace- and glob-expand shard URLs; a local pattern that matches no file raises at once."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    if not patterns:
        raise ValueError("no shard URLs given")
    out: list[str] = []
    for pattern in patterns:
        expanded = list(braceexpand(pattern))
        if not _is_local(pattern):
            out += expanded
            continue
        found, missing = [], []
        for path in expanded:
            path = path.removeprefix("file:")
            matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
            matches = [m for m in matches if os.path.isfile(m)]
            (found.extend(matches) if matches else missing.append(path))
        if not found:
            raise FileNotFoundError(f"shard pattern {pattern!r} matches no file")
        if missing:
            raise FileNotFoundError(
                f"shard pattern {pattern!r}: {len(missing)} of {len(expanded)} shards do not "
                f"exist (first: {missing[0]})"
            )
        out += found
    return out


class SkipCounter:
    """Counts what a worker skipped (bad shards, undecodable or incomplete samples) and warns,
    naming the shard and key, for the first ``warn_first`` and then every ``warn_every``-th."""

    def __init__(self, warn_first: int = 10, warn_every: int = 100) -> None:
        self.total = 0
        self.pending = 0
        self.warn_first, self.warn_every = warn_first, warn_every

    def record(self, where: str, exn: BaseException) -> None:
        self.total += 1
        self.pending += 1
        if self.total <= self.warn_first or self.total % self.warn_every == 0:
            reason = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
            warnings.warn(
                f"skipped {where}: {reason} ({self.total} skipped so far in this worker)",
                stacklevel=2,
            )

    def shard_error(self, exn: BaseException) -> bool:
        """webdataset handler for errors reading a shard: record and go on."""
        url = next((a for a in exn.args[1:][::-1] if isinstance(a, str)), "unknown shard")
        self.record(f"shard {url}", exn)
        return True

    def take(self) -> int:
        """Skips since the last call."""
        n, self.pending = self.pending, 0
        return n


def slot_info() -> tuple[int, int]:
    """(slot, number of slots) of this process and DataLoader worker across all ranks."""
    rank, world_size, worker, num_workers = pytorch_worker_info()
    return rank * num_workers + worker, world_size * num_workers


def seed_augmentations(key: str) -> None:
    """Seed the torch, Python and NumPy generators that transforms draw from."""
    seed = random.Random(key).getrandbits(63)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class ShardStream(IterableDataset):
    """Samples of ``urls`` through ``transform``, each carrying ``skipped``: how many bad
    samples or shards this worker skipped since the sample before it.

    Args:
        urls: expanded shard URLs.
        transform: objective's sample transform (raw webdataset dict to tensors); any exception
            it raises skips the sample.
        train: repeat forever and shuffle (True), or read once in order (False).
        samples_per_epoch: with ``train``, samples per epoch over all ranks.
        batch_size: per-rank batch size; every rank gets the same number of whole batches.
        shuffle_buffer: samples held for shuffling within the stream.
        seed: base of every random choice of the stream.
        start_epoch: epoch of the first iteration. The trainer sets each epoch with
            ``set_epoch`` (seen by persistent workers too); iterating in the main process
            without it moves to the next epoch after each pass.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: Transform,
        train: bool,
        samples_per_epoch: int | None = None,
        batch_size: int = 1,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        start_epoch: int = 0,
    ) -> None:
        super().__init__()
        if train and not samples_per_epoch:
            raise ValueError("a training stream needs samples_per_epoch")
        self.urls = list(urls)
        self.transform = transform
        self.train = train
        self.samples_per_epoch = samples_per_epoch
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        # Shared memory, so that workers started in an earlier epoch see the current one.
        self._epoch = multiprocessing.Value("i", start_epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration reads (its shard order, shuffle and augmentations)."""
        self._epoch.value = epoch

    def batches_per_rank(self) -> int:
        """Whole batches each rank yields per epoch (the same on every rank)."""
        _, world_size, _, _ = pytorch_worker_info()
        return max(self.samples_per_epoch // (world_size * self.batch_size), 1)

    def samples_for_slot(self, slot: int, slots: int) -> int:
        """This worker's share of its rank's batches, in samples."""
        num_workers = slots // pytorch_worker_info()[1]
        per_rank = self.batches_per_rank()
        worker = slot % num_workers
        return (per_rank // num_workers + (worker < per_rank % num_workers)) * self.batch_size

    def __len__(self) -> int:
        """Samples per epoch on this rank (training streams only; validation has no length)."""
        if not self.train:
            raise TypeError("a validation stream is read once and has no length")
        return self.batches_per_rank() * self.batch_size

    def _shards(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        """This slot's shards, pass after pass (once for validation), reshuffled every pass."""
        urls = list(self.urls)
        if len(urls) >= slots:
            # A fixed partition: slots never share a shard, even when reading ahead.
            random.Random(f"{self.seed}-partition").shuffle(urls)
            urls, tag = urls[slot::slots], f"slot{slot}"
        else:
            # Every slot reads every shard in the same order and keeps its own samples.
            tag = "all"
        for n_pass in itertools.count() if self.train else range(1):
            if self.train:
                random.Random(f"{self.seed}-{epoch}-{n_pass}-{tag}").shuffle(urls)
            yield from ({"url": url} for url in urls)

    def __iter__(self) -> Iterator[dict]:
        slot, slots = slot_info()
        epoch = self._epoch.value
        if pytorch_worker_info()[3] == 1 and self.train:
            self._epoch.value = epoch + 1  # iterated in the main process: pass after pass
        if self.train:
            seed_augmentations(f"{self.seed}-{epoch}-slot{slot}")
        counter = SkipCounter()
        samples = wds.tarfile_samples(self._shards(epoch, slot, slots), handler=counter.shard_error)
        if len(self.urls) < slots:
            samples = itertools.islice(samples, slot, None, slots)
        if self.train:
            rng = random.Random(f"{self.seed}-{epoch}-slot{slot}")
            initial = min(self.shuffle_buffer, 100)
            samples = wds.shuffle(self.shuffle_buffer, initial, rng=rng)(samples)
        out = self._transformed(samples, counter)
        if self.train:
            out = itertools.islice(out, self.samples_for_slot(slot, slots))
        yield from out

    def _transformed(self, samples: Iterator[dict], counter: SkipCounter) -> Iterator[dict]:
        # One item is held back so that skips after the last good sample are still reported.
        held = None
        for sample in samples:
            try:
                item = self.transform(sample)
            except Exception as exn:
                where = f"sample {sample.get('__key__')} in shard {sample.get('__url__')}"
                counter.record(where, exn)
                continue
            if held is not None:
                held["skipped"] = counter.take()
                yield held
            held = item
        if held is not None:
            held["skipped"] = counter.take()
            yield held

"""Streams of webdataset samples: split by rank and worker, deterministic, robust to bad data.

Every (rank, worker) slot reads its own fixed share of the shards; with fewer shards than
slots, all slots read every shard and keep every slots-th item (sample or skip), so slots never
see the same sample nor count the same skip. Training streams repeat forever (each pass
reshuffles the slot's shards from the seed, epoch and pass, and a buffer shuffles samples) and
each epoch takes a fixed number of samples. Validation streams are read once, split the same way.

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

from .samples import check_label
from .shard_reader import Unreadable, read_shard

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
    """Counts what a worker skipped (bad shards, undecodable or incomplete samples) and what it
    used, and warns: naming the shard and sample for the first ``warn_first`` skips of each shard
    and then its 10th, 100th, 1000th...; and when more than ``max_skipped_share`` of what it read
    was skipped (checked after 100, 200, 400... samples read)."""

    def __init__(self, warn_first: int = 3, max_skipped_share: float = 0.1) -> None:
        self.total = 0
        self.pending = 0
        self.used = 0
        self.warn_first, self.max_skipped_share = warn_first, max_skipped_share
        self._by_shard: dict[str | None, int] = {}
        self._next_check = 100

    def record(self, where: str, exn: BaseException, shard: str | None = None) -> None:
        """One skipped sample or shard remainder, ``where`` naming it."""
        self.total += 1
        self.pending += 1
        n = self._by_shard[shard] = self._by_shard.get(shard, 0) + 1
        if n <= self.warn_first or str(n).rstrip("0") == "1":
            reason = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
            counted = f" ({n} skipped in this shard so far)" if shard else ""
            warnings.warn(f"skipped {where}: {reason}{counted}", stacklevel=2)
        self._check_share()

    def use(self) -> None:
        """One sample used."""
        self.used += 1
        self._check_share()

    def _check_share(self) -> None:
        read = self.total + self.used
        if read < self._next_check:
            return
        self._next_check = 2 * read
        if self.total > self.max_skipped_share * read:
            warnings.warn(
                f"{self.total} of the {read} samples and shards read so far by this worker were "
                f"skipped ({self.total / read:.0%}, more than {self.max_skipped_share:.0%}): see "
                "the warnings naming them",
                stacklevel=3,
            )

    def shard_error(self, exn: BaseException) -> bool:
        """webdataset handler for errors reading a shard: record and go on."""
        url = next((a for a in exn.args[1:][::-1] if isinstance(a, str)), "unknown shard")
        self.record(f"shard {url}", exn, url)
        return True

    def take(self) -> int:
        """Skips since the last call."""
        n, self.pending = self.pending, 0
        return n


class NoReadableSampleError(RuntimeError):
    """A stream read whole passes over its shards without finding a sample it could use."""


class _Pass:
    def __init__(self) -> None:
        self.in_flight = 0
        self.used = self.closed = False


class PassWatch:
    """Gives up on a training stream that cannot make progress: raises
    ``NoReadableSampleError`` when ``limit`` passes in a row over the slot's shards gave it no
    sample it could use. A pass ends once the reader closed it and each of its samples went
    through the transform; passes are judged in their order, whatever the shuffle buffer holds
    back. A ``limit`` of 0 never gives up (a stream read once ends by itself)."""

    def __init__(self, limit: int, describe: Callable[[int], str]) -> None:
        self.limit = limit
        self.describe = describe
        self.dead = 0
        self.passes: dict[int, _Pass] = {}  # passes not judged yet, in their order

    def read(self, n_pass: int) -> None:
        """The reader handed this slot a sample of pass ``n_pass``."""
        self.passes.setdefault(n_pass, _Pass()).in_flight += 1

    def close(self, n_pass: int) -> None:
        """The reader finished pass ``n_pass``."""
        self.passes.setdefault(n_pass, _Pass()).closed = True
        self._judge()

    def transformed(self, n_pass: int, used: bool) -> None:
        """A sample of pass ``n_pass`` went through the transform, usable or not."""
        state = self.passes[n_pass]
        state.in_flight -= 1
        state.used |= used
        self._judge()

    def _judge(self) -> None:
        while self.passes:
            n_pass, state = next(iter(self.passes.items()))
            if not state.closed or state.in_flight:
                return
            del self.passes[n_pass]
            self.dead = 0 if state.used else self.dead + 1
            if self.limit and self.dead >= self.limit:
                raise NoReadableSampleError(self.describe(self.dead))


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
    samples or shard remainders this worker skipped since the sample before it (the last sample
    also those after it). A worker that skipped but yields no sample ends its pass with a report
    ``{"skipped": n}`` instead, which is no sample: ``ShardLoader`` folds it into a batch.

    A sample is skipped, named in a rate-limited warning and counted exactly once when it cannot
    be read, its ``.cls`` is no label in ``[0, num_classes)`` (see ``samples.decode_label``) or
    the transform raises; an unreadable shard counts once for all it did not yield. A training
    worker that reads a whole pass over its shards without a usable sample raises
    ``NoReadableSampleError`` naming them (with fewer shards than workers, where every worker
    reads every shard and keeps its own share, after as many passes as there are workers).

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
        num_classes: where given, a ``.cls`` outside ``[0, num_classes)`` skips the sample.
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
        num_classes: int | None = None,
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
        self.num_classes = num_classes
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

    def _passes(self, epoch: int, slot: int, slots: int) -> Iterator[tuple[int, list[str]]]:
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
            yield n_pass, urls

    def _read(
        self, epoch: int, slot: int, slots: int, counter: SkipCounter, watch: PassWatch
    ) -> Iterator[tuple[int, dict]]:
        """(pass, raw sample) of this slot. With fewer shards than slots, the slot keeps every
        slots-th item of the common sequence, skips included, so that each skip is counted by
        one slot only; what cannot be read is counted here, ahead of the shuffle buffer."""
        shared = len(self.urls) < slots
        position = 0
        for n_pass, urls in self._passes(epoch, slot, slots):
            for url in urls:
                for item in read_shard(url):
                    position += 1
                    if shared and (position - 1) % slots != slot:
                        continue
                    if isinstance(item, Unreadable):
                        counter.record(item.where, item.error, url)
                        continue
                    watch.read(n_pass)
                    yield n_pass, item
            watch.close(n_pass)

    def _describe(self, slot: int, slots: int, counter: SkipCounter) -> Callable[[int], str]:
        urls = self.urls if len(self.urls) < slots else next(self._passes(0, slot, slots))[1]
        names = ", ".join(urls[:5]) + (f" and {len(urls) - 5} more" if len(urls) > 5 else "")
        rank, world_size, worker, num_workers = pytorch_worker_info()

        def describe(passes: int) -> str:
            return (
                f"no readable sample in {passes} whole pass{'es' if passes > 1 else ''} over "
                f"the shards {names} (DataLoader worker {worker} of {num_workers} on rank "
                f"{rank} of {world_size}; {counter.total} skipped, each named in a warning): "
                "fix or remove these shards"
            )

        return describe

    def __iter__(self) -> Iterator[dict]:
        slot, slots = slot_info()
        epoch = self._epoch.value
        if pytorch_worker_info()[3] == 1 and self.train:
            self._epoch.value = epoch + 1  # iterated in the main process: pass after pass
        if self.train:
            seed_augmentations(f"{self.seed}-{epoch}-slot{slot}")
        counter = SkipCounter()
        limit = slots if len(self.urls) < slots else 1
        watch = PassWatch(limit if self.train else 0, self._describe(slot, slots, counter))
        samples = self._read(epoch, slot, slots, counter, watch)
        if self.train:
            rng = random.Random(f"{self.seed}-{epoch}-slot{slot}")
            initial = min(self.shuffle_buffer, 100)
            samples = wds.shuffle(self.shuffle_buffer, initial, rng=rng)(samples)
        out = self._transformed(samples, counter, watch)
        if self.train:
            out = itertools.islice(out, self.samples_for_slot(slot, slots))
        yield from out

    def _transformed(
        self, samples: Iterator[tuple[int, dict]], counter: SkipCounter, watch: PassWatch
    ) -> Iterator[dict]:
        # One item is held back so that skips after the last good sample are still reported.
        held = None
        for n_pass, sample in samples:
            try:
                if self.num_classes is not None:
                    check_label(sample, self.num_classes)
                item = self.transform(sample)
            except Exception as exn:  # noqa: BLE001 - any failure skips the sample
                url = sample.get("__url__")
                counter.record(f"sample {sample.get('__key__')} in shard {url}", exn, url)
                watch.transformed(n_pass, used=False)
                continue
            counter.use()
            watch.transformed(n_pass, used=True)
            if held is not None:
                held["skipped"] = counter.take()
                yield held
            held = item
        if held is not None:
            held["skipped"] = counter.take()
            yield held
        elif counter.pending:
            yield {"skipped": counter.take()}

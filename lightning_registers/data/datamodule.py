"""One LightningDataModule over webdataset shards for every objective, and the DataLoader that
reports every skip of its stream's workers in the batches."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from torch.utils.data import DataLoader, default_collate

from .stream import NoReadableSampleError, ShardStream, expand_urls

Transform = Callable[[dict], dict]
NEEDED_URLS = {"fit": ("train_urls", "val_urls"), "validate": ("val_urls",), "test": ("val_urls",)}


def check_shard_urls(stage: str, arguments: Mapping) -> None:
    """Raise, naming them, when ``arguments`` (the DataModule's) lack shards ``stage`` reads."""
    missing = [name for name in NEEDED_URLS.get(stage, ()) if not arguments.get(name)]
    if missing:
        raise ValueError(f"{stage} needs data.{' and data.'.join(missing)}: set the shards")


class _SkipReportsApart:
    """``collate`` for batches of samples; a worker's skip report, alone in its batch, as is."""

    def __init__(self, collate: Callable[[list], dict]) -> None:
        self.collate = collate

    def __call__(self, items: list[dict]) -> dict:
        if len(items) == 1 and items[0].keys() == {"skipped"}:
            return {"skipped": torch.tensor([items[0]["skipped"]])}
        return self.collate(items)


class ShardLoader(DataLoader):
    """A DataLoader over a ``ShardStream`` whose batches carry in ``skipped`` every sample and
    shard remainder its workers skipped: a worker's end-of-pass report (``{"skipped": n}``, from
    a worker that yielded no sample) is no batch; its count joins the batch before it, so one
    batch is held back until the next arrives. A pass that skipped but made no batch raises
    ``NoReadableSampleError`` naming the shards."""

    def __init__(self, dataset: ShardStream, *args, collate_fn=default_collate, **kwargs) -> None:
        if not isinstance(collate_fn, _SkipReportsApart):
            collate_fn = _SkipReportsApart(collate_fn)
        super().__init__(dataset, *args, collate_fn=collate_fn, **kwargs)

    def __iter__(self) -> Iterator[dict]:
        return self._batches(super().__iter__())

    def _batches(self, batches: Iterator[dict]) -> Iterator[dict]:
        held, reported = None, 0
        for batch in batches:
            if batch.keys() == {"skipped"}:
                reported += skipped_in_batch(batch)
                continue
            if held is not None:
                held["skipped"][0] += reported
                reported = 0
                yield held
            held = batch
        if held is not None:
            held["skipped"][0] += reported
            yield held
        elif reported:
            urls = self.dataset.urls
            names = ", ".join(urls[:5]) + (f" and {len(urls) - 5} more" if len(urls) > 5 else "")
            raise NoReadableSampleError(
                f"no readable sample in the shards {names} ({reported} skipped, each named in "
                "a warning): fix or remove these shards"
            )


class ShardDataModule(L.LightningDataModule):
    """Webdataset shards for training (resampled, split by rank and worker) and validation (read
    once). The objective supplies the sample transform through ``make_transform(train)``.

    Args:
        train_urls: training shard URLs, brace patterns allowed (``data/x-{000000..000019}.tar``),
            local paths or anything webdataset opens.
        val_urls: validation shard URLs.
        batch_size: per-device batch size.
        num_workers: DataLoader worker processes per device.
        samples_per_epoch: training samples per epoch over all devices.
        val_batch_size: per-device validation batch size (default: ``batch_size``).
        shuffle_buffer: samples held in each worker's shuffle buffer.
        seed: seed of shard order and shuffling (augmentations follow Lightning's seed).
        image_size: image side the objective trains at (linked to the model).
        num_classes: number of classes (linked to the model where it has a classifier); a
            sample whose ``.cls`` is outside ``[0, num_classes)`` is skipped and counted.
        class_names_file: JSON list of class names (for zero-shot prompts); by default the
            ``classes.json`` next to the shards' folder, when there is one.
        persistent_workers: keep workers between epochs.
    """

    def __init__(
        self,
        train_urls: str | list[str] | None = None,
        val_urls: str | list[str] | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        samples_per_epoch: int = 100_000,
        val_batch_size: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        image_size: int = 224,
        num_classes: int = 1000,
        class_names_file: str | None = None,
        persistent_workers: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Expanding now makes a pattern that matches no file fail before any work starts.
        self.train_shards = expand_urls(train_urls) if train_urls else []
        self.val_shards = expand_urls(val_urls) if val_urls else []
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.image_size = image_size
        self.num_classes = num_classes
        self.class_names_file = class_names_file
        self.persistent_workers = persistent_workers
        self.start_epoch = 0

    def setup(self, stage: str) -> None:
        check_shard_urls(stage, self.hparams)

    @property
    def class_names(self) -> list[str] | None:
        """Class names from ``class_names_file`` or a ``classes.json`` beside the shards."""
        if self.class_names_file:
            return json.loads(Path(self.class_names_file).read_text())
        for shard in self.val_shards or self.train_shards:
            candidate = Path(shard).parent.parent / "classes.json"
            if candidate.is_file():
                return json.loads(candidate.read_text())
        return None

    def _transform(self, train: bool) -> Transform:
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "make_transform"):
            raise RuntimeError(
                "ShardDataModule needs a LightningModule with make_transform(train) to build "
                "its sample transform; pass transform= when using it on its own"
            )
        return module.make_transform(train=train)

    def _pin_memory(self) -> bool:
        return self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)

    def _loader(self, dataset: ShardStream, batch_size: int) -> ShardLoader:
        return ShardLoader(
            dataset,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=getattr(dataset.transform, "collate", default_collate),
            pin_memory=self._pin_memory(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataset(self, transform: Transform) -> ShardStream:
        """The resampled training stream through ``transform``."""
        if not self.train_shards:
            raise ValueError("no train_urls configured: set data.train_urls to train")
        return ShardStream(
            self.train_shards,
            transform,
            train=True,
            samples_per_epoch=self.samples_per_epoch,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            start_epoch=self.start_epoch,
            num_classes=self.num_classes,
        )

    def val_dataset(self, transform: Transform) -> ShardStream:
        """The validation shards read once, in order, through ``transform``."""
        if not self.val_shards:
            raise ValueError("no val_urls configured: set data.val_urls to validate")
        return ShardStream(self.val_shards, transform, train=False, num_classes=self.num_classes)

    def train_eval_dataloader(self, transform: Transform) -> ShardLoader:
        """The training shards read once in order through an evaluation ``transform`` (the
        reference set of k-NN and linear probes), split by rank and worker like validation."""
        if not self.train_shards:
            raise ValueError("no train_urls configured: set data.train_urls")
        dataset = ShardStream(
            self.train_shards, transform, train=False, num_classes=self.num_classes
        )
        return self._loader(dataset, self.val_batch_size)

    def train_dataloader(self, transform: Transform | None = None) -> ShardLoader:
        dataset = self.train_dataset(transform or self._transform(train=True))
        return self._loader(dataset, self.batch_size)

    def val_dataloader(self, transform: Transform | None = None) -> ShardLoader:
        dataset = self.val_dataset(transform or self._transform(train=False))
        return self._loader(dataset, self.val_batch_size)

    def test_dataloader(self, transform: Transform | None = None) -> ShardLoader:
        return self.val_dataloader(transform)

    def state_dict(self) -> dict:
        """The epoch a resumed fit starts in. Lightning makes the training iterator before it
        restores its loops, so the stream must know it from here, not from the trainer."""
        trainer = self.trainer
        if trainer is None:
            return {"next_epoch": self.start_epoch}
        finished = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        return {"next_epoch": trainer.current_epoch + int(finished)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.start_epoch = state_dict.get("next_epoch", 0)


def skipped_in_batch(batch: dict) -> int:
    """How many bad samples or shards the workers skipped while making ``batch``."""
    skipped = batch.get("skipped")
    return int(skipped.sum()) if isinstance(skipped, torch.Tensor) else 0

"""Callbacks the two-node tests add to their jobs: each rank writes what it saw into
``<out>/rank<R>.pt`` (appending to the file of an earlier run of the same job), so that the
test can compare ranks, nodes and runs."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class KeyedTransform:
    """The objective's sample transform, adding the sample's webdataset key to its output."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, sample: dict) -> dict:
        return {**self.transform(sample), "key": sample["__key__"]}


class RecordRank(Callback):
    """Per rank: the training sample keys of each epoch, each step's loss, the final weights
    and, for CLIP, the features and logits of the first step's loss.

    Args:
        out: folder of the ``rank<R>.pt`` files.
        pace: seconds each training step is stretched by, so that a test can signal a job
            between steps.
    """

    def __init__(self, out: str, pace: float = 0.0) -> None:
        self.out = Path(out)
        self.pace = pace
        self.seen = {"keys": {}, "losses": [], "clip": None, "world_size": None}

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Before the data module builds the training stream (and forks its workers).
        make_transform = pl_module.make_transform

        def keyed(train: bool):
            transform = make_transform(train=train)
            return KeyedTransform(transform) if train else transform

        pl_module.make_transform = keyed

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen["world_size"] = trainer.world_size
        criterion = getattr(pl_module, "criterion", None)
        if criterion is not None and hasattr(criterion, "get_logits"):
            get_logits = criterion.get_logits

            def recorded(image_features, text_features, logit_scale, *args, **kwargs):
                logits = get_logits(image_features, text_features, logit_scale, *args, **kwargs)
                if self.seen["clip"] is None:
                    self.seen["clip"] = {
                        "image": image_features.detach().cpu(),
                        "text": text_features.detach().cpu(),
                        "scale": logit_scale.detach().cpu(),
                        "logits": [x.detach().cpu() for x in logits],
                    }
                return logits

            criterion.get_logits = recorded

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        keys = batch.pop("key", [])
        self.seen["keys"].setdefault(trainer.current_epoch, []).extend(keys)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.seen["losses"].append((trainer.global_step, outputs["loss"].item()))
        time.sleep(self.pace)

    def on_train_end(self, trainer, pl_module) -> None:
        self.seen["weights"] = {k: v.detach().cpu() for k, v in pl_module.state_dict().items()}
        path = self.out / f"rank{trainer.global_rank}.pt"
        runs = torch.load(path) if path.exists() else []
        torch.save([*runs, self.seen], path)

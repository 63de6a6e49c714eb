"""What every objective shares: the backbone in the hyperparameters, the optimizer with its
warmup-cosine schedule, atomic checkpointing of the objective's key metric, and the count of
skipped samples."""

from __future__ import annotations

import inspect
import os
import random
import warnings
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..data import skipped_in_batch
from ..data.photometric import PHOTOMETRIC
from ..models import RegisterViT
from ..models.regional_compile import compile_blocks
from .checkpoint_io import AtomicCheckpoints
from .optim import build_optimizer, param_groups, peak_lr
from .requeue import SlurmRequeue
from .schedules import run_length, warmup_cosine_lr

# Lightning warns at every fit with a DataModule that the module's on_after_batch_transfer is
# the one used: here that is intended.
warnings.filterwarnings(
    "ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule`"
)
# Lets ``load_from_checkpoint`` rebuild the backbone from its saved config (class_path form).
_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


class ObjectiveModule(L.LightningModule):
    """Base of the objectives. Subclasses call ``save_objective_hparams(backbone)`` in their
    ``__init__``, implement ``make_transform(train)`` for the DataModule and set
    ``monitor``: the validation metric that picks the best checkpoint (higher is better).
    Objectives that mask patches set ``uses_mask_token``; for the others it is frozen."""

    monitor: str = "val/loss"
    monitor_mode: str = "max"
    uses_mask_token: bool = False
    image_mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    """Per-channel mean and std of the input normalization the backbone was trained with."""
    image_std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    def save_objective_hparams(self, backbone: RegisterViT) -> None:
        """Save the constructor arguments, the backbone as its class_path config; a negative
        learning rate or weight decay fails here, naming the argument."""
        self.save_hyperparameters(ignore=["backbone"], frame=inspect.currentframe().f_back)
        for key in ("lr", "min_lr", "weight_decay", "weight_decay_end"):
            if self.hparams.get(key, 0) < 0:
                raise ValueError(f"{key} must be >= 0, got {self.hparams[key]}")
        self.hparams["backbone"] = {
            "class_path": f"{RegisterViT.__module__}.{RegisterViT.__name__}",
            "init_args": backbone.config.as_kwargs(),
        }
        self.hparams.setdefault("_instantiator", _INSTANTIATOR)
        if not self.uses_mask_token:
            # DDP wants every trainable parameter to take part in the loss.
            backbone.mask_token.requires_grad_(False)
        self.skipped_train = 0
        self.skipped_val = 0
        self._train_transform = None

    def monitored_backbones(self) -> dict[str, RegisterViT]:
        """The backbones the monitoring callbacks watch, by name."""
        return {"backbone": self.backbone}

    def make_transform(self, train: bool) -> Callable[[dict], dict]:
        """The sample transform the DataModule applies for training or validation."""
        raise NotImplementedError

    def configure_callbacks(self) -> list[Callback]:
        """``last.ckpt`` plus the best by ``monitor`` (replacing the Trainer's default
        checkpointing unless it is off), all written atomically, the learning rate when there is
        a logger, and the Slurm requeue at a step boundary."""
        callbacks: list[Callback] = []
        if self.trainer.checkpoint_callback is not None:
            best = ModelCheckpoint(
                monitor=self.monitor,
                mode=self.monitor_mode,
                filename="best-{epoch}-{step}",
                auto_insert_metric_name=False,
            )
            # Lightning's save_last only follows saves of the best; this one always replaces.
            latest = ModelCheckpoint(filename="last", enable_version_counter=False)
            callbacks += [best, latest]
        if self.trainer.loggers:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks += [AtomicCheckpoints(), SlurmRequeue()]
        return callbacks

    def tower_blocks(self) -> list[nn.Module]:
        """The transformer blocks of every tower, as each model names them (``shard_units``);
        an objective with a tower of another kind adds its blocks."""
        backbones = [m for m in self.modules() if isinstance(m, RegisterViT)]
        return [block for backbone in backbones for block in backbone.shard_units()]

    def fsdp_units(self) -> list[nn.Module]:
        """Modules FSDP2 shards one by one, inner before outer: every tower block, then every
        child module the objective calls (parameters are gathered when a unit's forward runs,
        so objectives call these modules rather than their other methods)."""
        units = self.tower_blocks()
        for child in self.children():
            parts = child.values() if isinstance(child, nn.ModuleDict) else [child]
            units += [m for m in parts if any(True for _ in m.parameters())]
        return units

    def configure_model(self) -> None:
        """FSDP2 under ModelParallelStrategy: ``fully_shard`` each unit of ``fsdp_units``.
        Parameters held by the module itself stay replicated; their gradients are averaged
        across ranks before each optimizer step. Then, with ``compile``, each tower block is
        compiled (``compile_blocks``: regional compilation, which composes with FSDP2 and
        activation checkpointing)."""
        if self._trainer is None:
            return  # load_from_checkpoint calls this hook too
        sharded = any(isinstance(m, FSDPModule) for m in self.modules())
        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not sharded:
            mesh = self.device_mesh["data_parallel"]
            for unit in self.fsdp_units():
                fully_shard(unit, mesh=mesh)
        if self.hparams.get("compile"):
            compile_blocks(self.tower_blocks())

    def on_before_optimizer_step(self, optimizer) -> None:
        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        for param in self.parameters(recurse=False):
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.trainer.world_size

    def configure_optimizers(self):
        hp = self.hparams
        groups = param_groups(self, hp.weight_decay, hp.get("no_decay_rule", "tokens"))
        lr = peak_lr(hp, self.trainer)
        optimizer = build_optimizer(hp.optimizer, groups, lr, tuple(hp.betas), hp.eps)
        total, steps_per_epoch = run_length(self.trainer)
        warmup = int(hp.warmup_epochs * steps_per_epoch)
        scheduler = warmup_cosine_lr(optimizer, total, warmup, hp.min_lr_ratio)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """A batch that carries photometric parameters (the training transform's
        ``photometric_on_device``) gets its photometric augmentations here, on the device, from
        that transform's ``batch_stage``."""
        if isinstance(batch, dict) and PHOTOMETRIC in batch:
            if self._train_transform is None:
                self._train_transform = self.make_transform(train=True)
            batch = self._train_transform.batch_stage(batch)
            # Lightning converted the batch for "-true" precisions before the transfer, when it
            # held uint8 crops; convert the float crops made here as it would have.
            batch = self.trainer.precision_plugin.convert_input(batch)
        return batch

    def on_train_epoch_start(self) -> None:
        """Point the data stream at this epoch (its order and augmentations follow from the
        data seed and the epoch alone)."""
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """At an epoch's first batch, seed the random state of the model's side (drop-path,
        Mixup) from (seed, epoch, rank) alone, so that a run resumed at an epoch boundary
        continues exactly as an uninterrupted one. Not earlier: creating the DataLoader iterator
        draws from it in a fresh process but not with persistent workers."""
        if batch_idx != 0:
            return
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        key = f"{seed}-{self.current_epoch}-rank{self.global_rank}"
        torch.manual_seed(random.Random(key).getrandbits(63))
        random.seed(key)
        np.random.seed(random.Random(key).getrandbits(32))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.skipped_train += skipped_in_batch(batch)
        self.log(
            "data/skipped_train",
            float(self.skipped_train),
            sync_dist=True,
            reduce_fx="sum",
            batch_size=1,
        )

    def on_validation_epoch_start(self) -> None:
        self.skipped_val = 0

    def on_validation_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx=0) -> None:
        self.skipped_val += skipped_in_batch(batch)

    def on_validation_epoch_end(self) -> None:
        self.log("data/skipped_val", float(self.skipped_val), sync_dist=True, reduce_fx="sum")

    def gather_all(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate ``tensor`` (N_rank, ...) of every rank, where N_rank may differ."""
        if self.trainer.world_size == 1:
            return tensor
        sizes = self.all_gather(torch.tensor(len(tensor), device=tensor.device)).tolist()
        padded = tensor.new_zeros(max(sizes), *tensor.shape[1:])
        padded[: len(tensor)] = tensor
        gathered = self.all_gather(padded)
        return torch.cat([part[:n] for part, n in zip(gathered, sizes, strict=True)])

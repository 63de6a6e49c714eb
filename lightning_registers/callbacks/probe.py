"""What the monitoring callbacks share: a fixed probe batch from validation data (with its
objects where the samples have boxes), the backbones to watch, a forward that leaves training
untouched, and rank-0 TensorBoard logging."""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw
from torch import nn
from torch.distributed.fsdp import FSDPModule

from ..data.samples import IMAGE_KEYS, decode_image, decode_meta
from ..measures.placement import UNKNOWN


def monitored_backbones(pl_module: L.LightningModule) -> dict[str, nn.Module]:
    """The RegisterViTs to watch, by name: the module's ``monitored_backbones()`` (DINO: student
    and teacher), else its ``backbone`` attribute."""
    if hasattr(pl_module, "monitored_backbones"):
        return dict(pl_module.monitored_backbones())
    if isinstance(getattr(pl_module, "backbone", None), nn.Module):
        return {"backbone": pl_module.backbone}
    raise AttributeError(
        f"{type(pl_module).__name__} has neither monitored_backbones() nor a backbone to monitor"
    )


@contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Afterwards the torch (and ``device``'s CUDA), Python and NumPy random states are as they
    were, so that monitoring never changes the training run."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextmanager
def probing(module: nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and preserved random states for a probe forward; afterwards
    every submodule's training flag is as it was and FSDP2 parameters are sharded again."""
    modes = {m: m.training for m in module.modules()}
    device = next(module.parameters()).device
    try:
        with preserved_rng(device), torch.no_grad():
            module.eval()
            yield
    finally:
        for m, training in modes.items():
            m.training = training
            if isinstance(m, FSDPModule):
                m.reshard()  # an FSDP2 root keeps its gathered parameters after a forward


class WithObjects:
    """A validation sample transform that adds ``objects`` (H, W) to its output: 1 on the
    sample's object boxes (``.json`` ``objects[].box``, as the demo scenes write them), 0 on the
    background, ``UNKNOWN`` everywhere for a sample without boxes. The boxes are drawn as an
    image and sent through the same transform, so any resize and crop moves them as it moves the
    image (the transform must be deterministic, as evaluation transforms are)."""

    def __init__(self, transform: Callable[[dict], dict]) -> None:
        self.transform = transform

    def __call__(self, sample: dict) -> dict:
        out = self.transform(sample)
        try:
            boxes = [o["box"] for o in decode_meta(sample)["objects"]]
        except (KeyError, TypeError, ValueError):
            out["objects"] = torch.full(out["image"].shape[-2:], UNKNOWN)
            return out
        size = decode_image(sample).size
        drawn, none, full = (self._through(sample, size, b) for b in (boxes, [], [(0, 0, *size)]))
        out["objects"] = ((drawn - none) > 0.5 * (full - none)).float()
        return out

    def _through(self, sample: dict, size: tuple[int, int], boxes: list) -> torch.Tensor:
        """The first channel of the transformed image of ``boxes`` drawn white on black."""
        mask = Image.new("RGB", size)
        draw = ImageDraw.Draw(mask)
        for x0, y0, x1, y1 in boxes:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 255, 255))
        buffer = io.BytesIO()
        mask.save(buffer, format="PNG")
        fields = {k: v for k, v in sample.items() if k not in IMAGE_KEYS}
        return self.transform({**fields, "png": buffer.getvalue()})["image"][0]


def collect_probe(
    trainer: L.Trainer, pl_module: L.LightningModule, n: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``n`` validation images (fewer if validation has fewer), as the validation
    loader yields them, and their object masks (N, H, W) (see ``WithObjects``; None when the
    data module cannot make them); rank 0's are broadcast so that every rank probes the same."""
    datamodule = trainer.datamodule
    if datamodule is not None and hasattr(pl_module, "make_transform"):
        loader = datamodule.val_dataloader(WithObjects(pl_module.make_transform(train=False)))
    else:
        loader = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    if loader is None:
        raise ValueError("the monitoring callbacks take their probe images from validation data")
    images, objects = [], []
    for batch in loader:
        taken = slice(0, n - sum(len(x) for x in images))
        images.append((batch["image"] if isinstance(batch, dict) else batch[0])[taken])
        if isinstance(batch, dict) and "objects" in batch:
            objects.append(batch["objects"][taken])
        if sum(len(x) for x in images) >= n:
            break
    if not images:
        raise ValueError("the validation data yielded no probe images for monitoring")
    probe = (torch.cat(images), torch.cat(objects) if objects else None)
    return trainer.strategy.broadcast(probe, src=0)


def run_dir(trainer: L.Trainer) -> Path:
    """The run directory as rank 0 sees it, without the collective of ``trainer.log_dir``."""
    logger = trainer.logger
    if logger is None:
        return Path(trainer.default_root_dir)
    return Path(logger.log_dir if isinstance(logger, TensorBoardLogger) else logger.save_dir)


def tensorboard(trainer: L.Trainer):
    """The TensorBoard SummaryWriter of the run on global rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class ProbeCallback(Callback):
    """Base of the monitors: every ``every_n_steps`` optimizer steps (and once before the first)
    it runs ``measure`` on the probe batch for each watched backbone on every rank, and
    ``report`` on rank 0.

    Args:
        every_n_steps: cadence in optimizer steps.
        probe_size: validation images in the probe batch.
        save_png: also write the figures as PNG files under ``<run dir>/figures/`` at each check.
    """

    def __init__(self, every_n_steps: int, probe_size: int, save_png: bool = False) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if probe_size < 1:
            raise ValueError(f"probe_size must be >= 1, got {probe_size}")
        self.every_n_steps = every_n_steps
        self.probe_size = probe_size
        self.save_png = save_png
        self.probe: torch.Tensor | None = None
        self.probe_objects: torch.Tensor | None = None
        """Object masks of the probe images (N, H, W), see ``WithObjects``; None if unknown."""
        self.last_checked_step: int | None = None
        self.results: dict[str, dict] = {}
        """The latest measurement of each backbone, by name."""

    def measure(self, backbone: nn.Module, images: torch.Tensor) -> dict:
        """What this monitor computes on the probe batch (runs on every rank)."""
        raise NotImplementedError

    def report(self, writer, name: str, result: dict, images: torch.Tensor, step: int) -> None:
        """Log ``result`` of backbone ``name`` to TensorBoard (rank 0, writer may be None)."""
        raise NotImplementedError

    def save_figures(self, out_dir: str | Path, step: int | None = None) -> list[Path]:
        """Write the latest results as PNG files (matplotlib) under ``out_dir``."""
        raise NotImplementedError

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.check(trainer, pl_module)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure and report at the current global step (once per step)."""
        step = trainer.global_step
        if step == self.last_checked_step:
            return
        self.last_checked_step = step
        if self.probe is None:
            with preserved_rng(pl_module.device):
                probe, objects = collect_probe(trainer, pl_module, self.probe_size)
            self.probe = probe.cpu()
            self.probe_objects = None if objects is None else objects.cpu()
        self.run(pl_module, step, tensorboard(trainer))
        if self.save_png and trainer.is_global_zero:
            self.save_figures(run_dir(trainer) / "figures", step)

    def run(self, pl_module: L.LightningModule, step: int, writer=None) -> dict[str, dict]:
        """Measure every watched backbone on the probe batch and report to ``writer``."""
        backbones = monitored_backbones(pl_module)
        images = self.probe.to(pl_module.device)
        for name, backbone in backbones.items():
            with probing(backbone):
                dtype = next(backbone.parameters()).dtype
                self.results[name] = self.measure(backbone, images.to(dtype))
            self.results[name]["step"] = step
            if writer is not None:
                self.report(writer, name, self.results[name], self.probe, step)
        return self.results

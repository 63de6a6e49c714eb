"""Short training runs with the monitors, and scenes for backbones whose high-norm tokens are
planted at known patches (``analysis/planted.py``): a plain background with one noise object at
a known box, so that planted tokens sit either on redundant background or on the object."""

import io
import json
from pathlib import Path

import lightning as L
import numpy as np
import torch
from analysis.planted import PLANTED, SIDE, planted_backbone
from demo_run import quiet_trainer
from lightning.pytorch.callbacks import LambdaCallback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_registers.data import ShardDataModule
from lightning_registers.data.writers import write_shards
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import SupervisedModule

OBJECT_BOX = (24, 24, 40, 40)  # pixels: patch rows 3-4, columns 3-4
OBJECT_PATCHES = (27, 28, 36)  # three patches of the object
BACKGROUND_PATCHES = PLANTED  # their 3x3 neighbourhoods are all background
SWITCH_STEP = 4  # the shared switched-on runs (conftest.py): planted tokens on after this step
MAX_STEPS = 12
REGISTERS = 2  # of tiny_backbone


def tiny_backbone(seed: int = 0) -> RegisterViT:
    """A random 2-block ViT for 32 px images (4 x 4 patches) with ``REGISTERS`` registers."""
    torch.manual_seed(seed)
    return RegisterViT(
        "vit_tiny",
        img_size=32,
        patch_size=8,
        num_registers=REGISTERS,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )


def accumulator(log_dir) -> EventAccumulator:
    """Every event of the run in ``log_dir``, loaded."""
    events = EventAccumulator(
        str(log_dir), size_guidance={"histograms": 0, "images": 0, "scalars": 0, "tensors": 0}
    )
    events.Reload()
    return events


def scene_samples(n: int, seed: int = 0):
    """``n`` webdataset samples: a uniform colour with a noise square in ``OBJECT_BOX``."""
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = OBJECT_BOX
    for i in range(n):
        pixels = np.broadcast_to(rng.integers(0, 256, 3), (SIDE, SIDE, 3)).astype(np.uint8).copy()
        pixels[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        meta = {"objects": [{"box": list(OBJECT_BOX)}]}
        yield {
            "__key__": f"s{i:04d}",
            "png": buffer.getvalue(),
            "cls": str(i % 2).encode(),
            "json": json.dumps(meta).encode(),
        }


def write_scenes(out: Path, n: int = 32) -> str:
    """Shards of ``scene_samples``; returns their URL pattern."""
    write_shards(scene_samples(n), out, "scenes", maxcount=16, progress=False)
    return str(out / "scenes-*.tar")


def artifact_backbone(on_background: bool = True):
    """The paper's case: tokens planted from block 1 on the background patches; else the
    look-alike: tokens planted from block 0 on the object patches."""
    if on_background:
        return planted_backbone(positions=BACKGROUND_PATCHES, block_index=1)
    return planted_backbone(positions=OBJECT_PATCHES, block_index=0)


def switched_on_at(backbone, step: int) -> LambdaCallback:
    """Hides the planted tokens' marker now and restores it after training step ``step`` (put
    the callback before the monitors so that their check at ``step`` sees the tokens)."""
    marker = backbone.pos_embed[..., 2].detach().clone()
    with torch.no_grad():
        backbone.pos_embed[..., 2] = 0

    def restore(trainer, *args):
        if trainer.global_step == step:
            with torch.no_grad():
                backbone.pos_embed[..., 2] = marker

    return LambdaCallback(on_train_batch_end=restore)


def fit(
    root: Path,
    train_urls: str,
    val_urls: str,
    backbone,
    callbacks,
    max_steps: int = 6,
    lr: float = 0.0,
    image_size: int = 32,
    name: str = "run",
    **module_args,
) -> L.Trainer:
    """Train ``backbone`` supervised for ``max_steps`` steps of 4 images on CPU, logging to
    TensorBoard under ``root/name/version_0`` (lr 0 keeps the weights as they are)."""
    L.seed_everything(0)
    module = SupervisedModule(
        backbone,
        num_classes=10,
        image_size=image_size,
        lr=lr,
        warmup_epochs=0,
        optimizer="adamw",
        **module_args,
    )
    data = ShardDataModule(
        train_urls,
        val_urls,
        batch_size=4,
        num_workers=0,
        samples_per_epoch=16,
        image_size=image_size,
        num_classes=10,
    )
    trainer = quiet_trainer(
        max_steps=max_steps,
        logger=TensorBoardLogger(root, name=name),
        callbacks=callbacks,
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def fit_demo(tmp_path, demo_shards, backbone, callbacks, **kwargs) -> L.Trainer:
    """``fit`` on the session's demo shards."""
    train, val = (str(demo_shards / split / "*.tar") for split in ("train", "val"))
    return fit(tmp_path, train, val, backbone, callbacks, **kwargs)

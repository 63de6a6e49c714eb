"""A callback the scale-out tests add to CLI runs: the exported backbone's output on fixed
images at the end of training, saved by rank 0 (the forward runs on every rank: FSDP2)."""

import os
import signal

import torch
from lightning.pytorch.callbacks import Callback

from lightning_registers.objectives.checkpoint import exported_backbone


def probe_images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class RecordOutputs(Callback):
    """Saves ``{"output": (3, D)}`` to ``path`` when training ends."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module) -> None:
        backbone = exported_backbone(pl_module)
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            output = backbone(probe_images().to(pl_module.device))
        backbone.train(was_training)
        if trainer.is_global_zero:
            torch.save({"output": output.cpu()}, self.path)


class RecordLosses(Callback):
    """Appends ``step loss`` (full precision) of rank 0 to ``path`` after every training
    batch."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(f"{trainer.global_step} {outputs['loss'].item()!r}\n")


class KillAt(Callback):
    """SIGKILLs its own process after optimizer step ``step``: a crash with no clean-up."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

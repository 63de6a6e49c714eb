"""Checkpoint and requeue a Slurm job on its requeue signal, at a training-step boundary.

Lightning's own handler saves the checkpoint inside the signal handler, which runs wherever each
rank happens to be: under DDP or FSDP one rank can enter the checkpoint's collectives while
another still waits in a gradient all-reduce, and the job hangs until Slurm kills it, without
a checkpoint and without a requeue."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


def hpc_checkpoint_path(run_dir: str | Path) -> Path:
    """The next ``hpc_ckpt_N.ckpt`` in ``run_dir``: the name Lightning resumes a requeued job
    from (the highest N)."""
    numbers = [
        int(match.group(1))
        for path in Path(run_dir).glob("hpc_ckpt_*.ckpt")
        if (match := HPC_CHECKPOINT.fullmatch(path.name))
    ]
    return Path(run_dir) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def requeue_job() -> int:
    """``scontrol requeue`` this job (or array task); returns scontrol's exit code."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    else:
        job = os.environ["SLURM_JOB_ID"]
    return subprocess.call(["scontrol", "requeue", job])


class SlurmRequeue(Callback):
    """On Slurm with auto-requeue (Lightning's ``SLURMEnvironment``, detected under srun), the
    requeue signal only raises a flag; after each training batch the ranks agree on it (one
    all-reduce of a boolean), then every rank takes part in saving ``hpc_ckpt_N.ckpt`` into the
    run directory (atomically, as every checkpoint: ``checkpoint_io``), rank 0 requeues the job
    and training stops. Every objective adds it; it does
    nothing elsewhere, and a single-process run keeps Lightning's handler."""

    def __init__(self) -> None:
        self.requested = False
        self._signal: int | None = None
        self._previous = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if stage != "fit" or not isinstance(environment, SLURMEnvironment):
            return
        if not environment.auto_requeue or self._signal is not None:
            return
        # Installed before Lightning registers its handlers, which then leaves this signal alone.
        self._signal = environment.requeue_signal
        self._previous = signal.signal(self._signal, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._signal is None:
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.requested = False
        path = hpc_checkpoint_path(trainer.default_root_dir)
        rank_zero_info(f"requeue signal: saving {path} and requeueing the job")
        for logger in trainer.loggers:  # the job may be killed before the loggers close
            flush = getattr(getattr(logger, "experiment", None), "flush", None)
            if callable(flush):
                flush()
        trainer.save_checkpoint(path)
        if trainer.is_global_zero and requeue_job() != 0:
            rank_zero_warn("scontrol requeue failed: the job will not restart by itself")
        trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._signal is not None:
            signal.signal(self._signal, self._previous)
            self._signal = None

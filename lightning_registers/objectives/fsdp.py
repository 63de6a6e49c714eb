"""FSDP2 as a Lightning strategy: ModelParallelStrategy with every rank a data-parallel shard."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from .checkpoint_io import AtomicCheckpointIO, publish_directory, temp_path


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel over all ranks of the job (no tensor parallelism), whatever
    the number of nodes and devices; the LightningModule's ``configure_model`` applies
    ``fully_shard``. ModelParallelStrategy's "auto" sizes mean one data-parallel group per node,
    which is not FSDP over the whole job.

    Sharded checkpoints are written into a directory beside their path and published by one
    rename (``checkpoint_io.publish_directory``): the path is a link to the newest complete
    directory, so a job killed while saving keeps its previous checkpoint. Consolidated ones
    (``save_distributed_checkpoint=False``) are single files written atomically.

    Args:
        save_distributed_checkpoint: save sharded checkpoints (a directory per checkpoint).
        process_group_backend: "nccl" on GPU (default), "gloo" on CPU.
        timeout: collective timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: datetime.timedelta | None = datetime.timedelta(seconds=1800),
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.checkpoint_io = AtomicCheckpointIO()

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None
    ) -> None:
        if not self._save_distributed_checkpoint or storage_options is not None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(filepath))
        staged = Path(self.broadcast(temp_path(path.parent)))  # rank 0's name for all
        # Rank 0 returns once every rank's shard is written (it gathers their write results).
        super().save_checkpoint(checkpoint, staged)
        if self.is_global_zero:
            publish_directory(staged, path)

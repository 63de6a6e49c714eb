"""FSDP2 as a Lightning strategy: ModelParallelStrategy with every rank a data-parallel shard."""

from __future__ import annotations

import datetime

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel over all ranks of the job (no tensor parallelism), whatever
    the number of nodes and devices; the LightningModule's ``configure_model`` applies
    ``fully_shard``. ModelParallelStrategy's "auto" sizes mean one data-parallel group per node,
    which is not FSDP over the whole job.

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

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

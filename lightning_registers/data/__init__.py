"""Webdataset shards: writing, the generated demo dataset, transforms and the DataModule."""

from .datamodule import ShardDataModule, ShardLoader, skipped_in_batch
from .masking import BlockMaskGenerator
from .scenes import CLASS_NAMES, generate_scene
from .stream import NoReadableSampleError, ShardStream, SkipCounter, expand_urls
from .transforms import ClipTransform, EvalTransform, MultiCropTransform, ThreeAugment
from .writers import (
    WriteSummary,
    write_demo_shards,
    write_folder_shards,
    write_table_shards,
)

__all__ = [
    "CLASS_NAMES",
    "BlockMaskGenerator",
    "ClipTransform",
    "EvalTransform",
    "MultiCropTransform",
    "NoReadableSampleError",
    "ShardDataModule",
    "ShardLoader",
    "ShardStream",
    "SkipCounter",
    "ThreeAugment",
    "WriteSummary",
    "expand_urls",
    "generate_scene",
    "skipped_in_batch",
    "write_demo_shards",
    "write_folder_shards",
    "write_table_shards",
]

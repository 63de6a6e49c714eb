"""What the tests that run the CLI on the session's demo shards share."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def demo_data(demo_shards: Path, **fields) -> dict:
    """The ``data`` section of a tiny run on the test demo shards: 32 px, batches of 4, no
    workers, 16 samples an epoch; ``fields`` override or add."""
    return {
        "train_urls": str(demo_shards / "train" / "*.tar"),
        "val_urls": str(demo_shards / "val" / "*.tar"),
        "image_size": 32,
        "batch_size": 4,
        "num_workers": 0,
        "samples_per_epoch": 16,
        **fields,
    }


def write_yaml(path: Path, config: dict) -> Path:
    """``config`` written to ``path`` as YAML; returns the path."""
    path.write_text(yaml.safe_dump(config))
    return path

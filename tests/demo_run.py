"""What the tests that run the CLI on the session's demo shards share."""

from pathlib import Path

import lightning as L
import yaml

from lightning_registers.data import ShardDataModule

ROOT = Path(__file__).resolve().parents[1]
# Configs that state only what differs from another (their base), given after it.
BASE_CONFIGS = {
    "dino/vit_l14_reg0.yaml": "dino/vit_l14_reg4.yaml",
    "supervised/deit3_vit_b16_reg0.yaml": "supervised/deit3_vit_b16_reg4.yaml",
    "clip/openclip_vit_b16_reg0.yaml": "clip/openclip_vit_b16_reg4.yaml",
    "experiments/in1k_reg0.yaml": "experiments/deit3_vit_s16_in1k.yaml",
    "experiments/in100_reg0.yaml": "experiments/deit3_vit_s16_in100.yaml",
}


def config_files(config: Path) -> list[Path]:
    """The files a run of ``config`` (a path under configs/) gives, in order: its base first."""
    name = config.relative_to(ROOT / "configs").as_posix()
    base = [ROOT / "configs" / BASE_CONFIGS[name]] if name in BASE_CONFIGS else []
    return [*base, config]


def config_args(config: Path) -> list[str]:
    """``--config`` arguments of ``config_files(config)``."""
    return [arg for path in config_files(config) for arg in ("--config", str(path))]


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


DINO_TINY = {
    "local_crop_size": 16,
    "num_local_crops": 2,
    "n_prototypes": 32,
    "ibot_n_prototypes": 32,
    "head_hidden_dim": 32,
    "head_bottleneck_dim": 16,
    "ibot_bottleneck_dim": 16,
    "knn_train_samples": 16,
    "linear_probe_steps": 5,
}
# CLIP's text tower at the image tower's tiny size; tokenizer, context and templates as given.
CLIP_TINY = {"embed_dim": 16, "text_width": 32, "text_layers": 1, "text_heads": 2}


def tiny_overrides(tmp_path, demo_shards, config_file: Path | None = None, **data) -> Path:
    """A config that shrinks any objective config to a tiny model on the test demo shards."""
    text = config_file.read_text() if config_file is not None else ""
    objective = DINO_TINY if "DinoModule" in text else CLIP_TINY if "ClipModule" in text else {}
    config = {
        "model": {
            "init_args": {
                **objective,
                "backbone": {
                    "init_args": {
                        "arch": "vit_tiny",
                        "embed_dim": 32,
                        "depth": 1,
                        "num_heads": 2,
                        "patch_size": 8,
                    }
                },
            }
        },
        "data": demo_data(demo_shards, num_classes=10, **data),
    }
    return write_yaml(tmp_path / "tiny.yaml", config)


def demo_datamodule(demo_shards: Path, **fields) -> ShardDataModule:
    """The in-process data module of a tiny run on the test demo shards (``demo_data``, 10
    classes); ``fields`` override or add."""
    return ShardDataModule(**demo_data(demo_shards, **{"num_classes": 10, **fields}))


QUIET = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


def quiet_trainer(**options) -> L.Trainer:
    """An in-process CPU trainer with no logger, checkpoints, progress bar, model summary or
    sanity check; ``options`` override or add."""
    return L.Trainer(**{**QUIET, **options})

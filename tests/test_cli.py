"""The `lightning-registers` command: configs, runs, checkpoints, errors, shard writing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from demo_run import ROOT, config_args, config_files, tiny_overrides

from lightning_registers.cli import lightning_main, main

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
OBJECTIVE_CONFIGS = [c for c in CONFIGS if c.parent.name not in ("trainer", "monitoring")]
TRAINER_FRAGMENTS = [c for c in CONFIGS if c.parent.name == "trainer"]


@pytest.mark.parametrize("config", OBJECTIVE_CONFIGS, ids=lambda p: p.stem)
def test_every_objective_config_runs_a_fast_dev_run(config, tmp_path, demo_shards, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = lightning_main(
        [
            "fit",
            *config_args(config),
            "--config",
            str(tiny_overrides(tmp_path, demo_shards, config_files(config)[0])),
            "--trainer.fast_dev_run=1",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
        ]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 1


@pytest.mark.parametrize("fragment", TRAINER_FRAGMENTS, ids=lambda p: p.stem)
def test_trainer_fragments_compose_with_an_objective_config(
    fragment, tmp_path, demo_shards, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    cli = lightning_main(
        [
            "fit",
            "--config",
            str(fragment),
            "--config",
            str(ROOT / "configs/demo/supervised.yaml"),
            "--config",
            str(tiny_overrides(tmp_path, demo_shards)),
            "--trainer.fast_dev_run=1",
            "--trainer.accelerator=cpu",
        ]
    )
    assert cli.trainer.state.finished


def test_a_run_leaves_config_events_and_checkpoints_and_reloads_with_the_same_metrics(
    tmp_path, demo_shards, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    tiny = tiny_overrides(tmp_path, demo_shards, samples_per_epoch=32)
    demo = ROOT / "configs/demo/supervised.yaml"
    fit = lightning_main(
        [
            "fit",
            "--config",
            str(demo),
            "--config",
            str(tiny),
            "--trainer.max_epochs=2",
            "--experiment=check",
        ]
    )
    run = tmp_path / "runs" / "check" / "version_0"
    assert Path(fit.trainer.log_dir) == Path("runs/check/version_0")
    assert list(run.glob("events.out.tfevents.*"))
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # Linked values are stored once, under data, and flow to the model when it is rebuilt.
    assert saved["data"]["image_size"] == 32 and saved["data"]["num_classes"] == 10
    assert saved["model"]["init_args"]["backbone"]["init_args"]["embed_dim"] == 32
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(c.startswith("best-") for c in ckpts)
    fitted = {k: float(v) for k, v in fit.trainer.callback_metrics.items() if k.startswith("val/")}

    validate = lightning_main(
        [
            "validate",
            "--config",
            str(run / "config.yaml"),
            "--ckpt_path",
            str(run / "checkpoints" / "last.ckpt"),
        ]
    )
    again = {
        k: float(v) for k, v in validate.trainer.callback_metrics.items() if k.startswith("val/")
    }
    assert again == pytest.approx(fitted, rel=1e-6)

    # The checkpoint also rebuilds the module outside the CLI (notebooks, analysis).
    from lightning_registers.objectives import SupervisedModule

    module = SupervisedModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert module.backbone.num_registers == 4 and module.backbone.embed_dim == 32
    assert module.backbone.img_size == (32, 32) and module.head.out_features == 10


def test_unknown_config_key_fails_before_any_work_naming_it(tmp_path, demo_shards, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"init_args": {"head_pol": "cls"}}}))
    with pytest.raises(SystemExit) as exit_info:
        lightning_main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/demo/supervised.yaml"),
                "--config",
                str(tiny_overrides(tmp_path, demo_shards)),
                "--config",
                str(bad),
            ]
        )
    assert exit_info.value.code != 0
    assert "head_pol" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_missing_shards_fail_before_the_first_step_naming_the_pattern(tmp_path, capsys):
    pattern = str(tmp_path / "nowhere" / "shard-{000000..000009}.tar")
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/demo/supervised.yaml"),
                f"--data.train_urls={pattern}",
            ]
        )
    assert exit_info.value.code == 2
    assert pattern in capsys.readouterr().err


def test_shards_demo_command_writes_train_val_and_class_names(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_registers.cli",
            "shards",
            "demo",
            "--out",
            str(out),
            "--train",
            "12",
            "--val",
            "4",
            "--size",
            "16",
            "--maxcount",
            "5",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote 16 samples to 4 shards" in result.stdout
    assert len(list((out / "train").glob("*.tar"))) == 3
    assert json.loads((out / "classes.json").read_text())[0] == "red circle"


def test_shards_from_folder_command_reports_skipped_files(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "a" / "x.png")
    (tmp_path / "imgs" / "a" / "y.png").write_bytes(b"broken")
    main(
        ["shards", "from-folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--quiet"]
    )
    printed = capsys.readouterr().out
    assert "wrote 1 samples to 1 shards" in printed and "skipped 1 inputs" in printed

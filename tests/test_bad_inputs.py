"""Bad inputs to the command fail before any work with one line naming the key or the file:
config values out of range, missing shards, checkpoints that are empty, truncated, of another
objective or that would run code; our own fit checkpoints load with weights_only=True; resuming
skips what does not load and what a dry run left."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from demo_run import ROOT, tiny_overrides

from lightning_registers.analysis import load_backbone
from lightning_registers.cli import lightning_main, main
from lightning_registers.objectives import export_backbone, load_objective

OBJECTIVES = ("supervised", "clip", "dino")


class WritesAFile:
    """Unpickling this opens ``path`` for writing: the file appears only if the pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, demo_shards) -> Path:
    """One step of each demo objective, shrunk: ``runs/<objective>/version_0`` under the path
    returned, beside each objective's tiny config ``<objective>.yaml``."""
    root = tmp_path_factory.mktemp("fitted")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for objective in OBJECTIVES:
            config = ROOT / f"configs/demo/{objective}.yaml"
            tiny = tiny_overrides(root, demo_shards, config, samples_per_epoch=8)
            tiny.rename(root / f"{objective}.yaml")
            lightning_main(
                ["fit", "--config", str(config), "--config", str(root / f"{objective}.yaml"),
                 "--trainer.max_steps=1", "--trainer.enable_progress_bar=false",
                 f"--experiment={objective}"]
            )  # fmt: skip
    return root


def checkpoint_of(fitted: Path, objective: str) -> Path:
    return fitted / "runs" / objective / "version_0" / "checkpoints" / "last.ckpt"


def config_args(fitted: Path, objective: str) -> list[str]:
    return [
        "--config", str(ROOT / f"configs/demo/{objective}.yaml"),
        "--config", str(fitted / f"{objective}.yaml"),
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip


def fails_in_one_line(capsys, args: list[str]) -> str:
    """Run the command; it must exit with code 2 and one error line, without a traceback."""
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_our_fit_checkpoints_and_exports_load_with_weights_only(objective, fitted, tmp_path):
    path = checkpoint_of(fitted, objective)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["global_step"] == 1
    module = load_objective(path)
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, raw["state_dict"][key])
    exported = export_backbone(path, tmp_path / "backbone.pt")
    saved = torch.load(exported, map_location="cpu", weights_only=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = load_backbone(path).model(x)
        torch.testing.assert_close(load_backbone(exported).model(x), expected)
    assert saved["config"]["embed_dim"] == 32


def bad_checkpoint(kind: str, fitted: Path, tmp_path: Path) -> Path:
    """A copy of the supervised checkpoint: emptied, cut in half, or with a pickled object
    that writes ``tmp_path/ran`` when it loads."""
    path = tmp_path / f"{kind}.ckpt"
    source = checkpoint_of(fitted, "supervised")
    if kind == "empty":
        path.touch()
    elif kind == "truncated":
        path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    else:
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
        torch.save({**checkpoint, "extra": WritesAFile(tmp_path / "ran")}, path)
    return path


@pytest.mark.parametrize("command", ["fit", "validate", "export", "analyze"])
@pytest.mark.parametrize("kind", ["empty", "truncated", "runs_code"])
def test_a_bad_checkpoint_fails_before_any_work_naming_the_file(
    command, kind, fitted, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    path = bad_checkpoint(kind, fitted, tmp_path)
    args = {
        "fit": ["fit", *config_args(fitted, "supervised"), f"--ckpt_path={path}"],
        "validate": ["validate", *config_args(fitted, "supervised"), f"--ckpt_path={path}"],
        "export": ["export", str(path), "--out", str(tmp_path / "out.pt")],
        "analyze": ["analyze", "--checkpoint", str(path), "--images", "none", "--out", "out"],
    }[command]
    error = fails_in_one_line(capsys, args)
    assert str(path) in error
    expected = {"empty": "is empty", "truncated": "truncated", "runs_code": "imports"}[kind]
    assert expected in error
    if kind == "runs_code":
        option = "--weights_only false" if command in ("fit", "validate") else "--trust-checkpoint"
        assert option in error
        assert not (tmp_path / "ran").exists()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out.pt").exists()


def test_a_checkpoint_the_user_trusts_loads(fitted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = bad_checkpoint("runs_code", fitted, tmp_path)
    main(["export", str(path), "--out", str(tmp_path / "out.pt"), "--trust-checkpoint"])
    assert (tmp_path / "out.pt").is_file() and (tmp_path / "ran").exists()
    (tmp_path / "ran").unlink()
    validated = lightning_main(
        ["validate", *config_args(fitted, "supervised"), f"--ckpt_path={path}",
         "--weights_only=false"]
    )  # fmt: skip
    assert validated.trainer.state.finished and (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("--data.train_urls=null", "data.train_urls"),
        ("--model.init_args.backbone.init_args.num_registers=-1", "num_registers"),
        ("--data.image_size=36", "patch size 8"),
        ("--model.init_args.lr=-0.1", "lr must be >= 0"),
        ("--model.init_args.weight_decay=-0.05", "weight_decay must be >= 0"),
    ],
    ids=["no_train_urls", "negative_registers", "image_size", "negative_lr", "negative_wd"],
)
def test_config_errors_fail_before_any_work_naming_the_key(
    override, key, fitted, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    error = fails_in_one_line(capsys, ["fit", *config_args(fitted, "supervised"), override])
    assert key in error
    assert not (tmp_path / "runs").exists()


def test_validate_with_a_checkpoint_of_another_objective_names_both(
    fitted, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    path = checkpoint_of(fitted, "supervised")
    error = fails_in_one_line(
        capsys, ["validate", *config_args(fitted, "dino"), f"--ckpt_path={path}"]
    )
    assert "SupervisedModule" in error and "DinoModule" in error and str(path) in error


def test_resume_takes_the_newest_checkpoint_that_loads_and_no_dry_run_directory(
    fitted, tmp_path, monkeypatch, capsys, caplog
):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "supervised" / "version_0"
    shutil.copytree(fitted / "runs" / "supervised" / "version_0", run)
    last = run / "checkpoints" / "last.ckpt"
    broken = run / "hpc_ckpt_1.ckpt"  # a requeue checkpoint cut short, newer than last.ckpt
    broken.write_bytes(last.read_bytes()[:1000])
    os.utime(broken, (last.stat().st_mtime + 10,) * 2)
    demo = str(ROOT / "configs/demo/supervised.yaml")
    main(["submit", "--config", demo, "--experiment", "supervised", "--dry-run"])
    capsys.readouterr()
    assert (tmp_path / "runs" / "supervised" / "version_1" / "submit.sbatch").is_file()

    with pytest.warns(UserWarning) as warned, caplog.at_level("INFO"):
        lightning_main(
            ["fit", *config_args(fitted, "supervised"), "--experiment=supervised",
             "--ckpt_path=last", "--trainer.max_steps=2", "--trainer.callbacks=[]"]
        )  # fmt: skip
    skipped = [str(w.message) for w in warned if "hpc_ckpt_1.ckpt" in str(w.message)]
    used = last.relative_to(tmp_path)
    assert len(skipped) == 1 and f"resuming from {used} instead" in skipped[0]
    assert f"resuming from {used}" in caplog.text
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 2  # one step on from the fitted run's one
    assert not (tmp_path / "runs" / "supervised" / "version_1" / "checkpoints").exists()

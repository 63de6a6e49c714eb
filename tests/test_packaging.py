"""The package as users install it: the wheel carries the configs, which run by name from any
directory, and ``--config`` takes a shipped name."""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import tomllib
import yaml

from lightning_registers.shipped_configs import (
    config_names,
    configs_dir,
    copy_configs,
    expand_config_args,
    resolve_config,
)

ROOT = Path(__file__).resolve().parents[1]
CACHES = shutil.ignore_patterns("__pycache__")


def test_the_wheel_lists_every_package_and_config_folder():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "lightning_registers").rglob("__init__.py")
    }
    config_folders = {
        ".".join(("lightning_registers", *p.relative_to(ROOT).parts))
        for p in [ROOT / "configs", *(ROOT / "configs").rglob("*")]
        if p.is_dir()
    }
    assert set(setuptools["packages"]) == code | config_folders
    assert setuptools["package-dir"] == {"lightning_registers.configs": "configs"}
    assert set(setuptools["package-data"]) == config_folders


def test_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert configs_dir() == ROOT / "configs"
    expected = str(ROOT / "configs" / "demo" / "supervised.yaml")
    for name in ("demo/supervised", "demo/supervised.yaml", "configs/demo/supervised.yaml"):
        assert resolve_config(name) == expected
    assert "experiments/in100_reg0" in config_names()
    assert len(config_names()) == len(list((ROOT / "configs").rglob("*.yaml")))
    # A local file of the same path wins over the shipped one.
    local = tmp_path / "demo" / "supervised.yaml"
    local.parent.mkdir()
    local.write_text("experiment: mine\n")
    assert resolve_config("demo/supervised.yaml") == "demo/supervised.yaml"
    assert expand_config_args(
        ["fit", "--config", "trainer/cpu", "--config=demo/dino", "-c", "demo/supervised.yaml"]
    ) == [
        "fit",
        "--config",
        str(ROOT / "configs" / "trainer" / "cpu.yaml"),
        f"--config={ROOT / 'configs' / 'demo' / 'dino.yaml'}",
        "-c",
        "demo/supervised.yaml",
    ]
    with pytest.raises(FileNotFoundError, match=r"config demo/nope is neither.*demo/clip"):
        expand_config_args(["fit", "--config", "demo/nope"])


def test_copy_takes_the_files_a_config_includes(tmp_path):
    written = copy_configs(["experiments/deit3_vit_s16_in100"], tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "experiments/deit3_vit_s16_in100.yaml",
        "monitoring/cluster.yaml",
    ]
    copied = yaml.safe_load((tmp_path / "experiments/deit3_vit_s16_in100.yaml").read_text())
    assert (tmp_path / "experiments" / copied["trainer"]["callbacks"]).is_file()
    before = (tmp_path / "monitoring/cluster.yaml").read_text()
    with pytest.raises(FileExistsError, match="monitoring/cluster.yaml"):
        copy_configs(["demo/supervised", "monitoring/cluster"], tmp_path)
    assert (tmp_path / "monitoring/cluster.yaml").read_text() == before
    assert not (tmp_path / "demo").exists()  # nothing written when anything would be overwritten


def run(args: list, cwd: Path) -> str:
    done = subprocess.run(list(map(str, args)), cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_a_wheel_installed_outside_the_checkout_runs_the_demo_by_name(tmp_path):
    """Build the wheel, install it alone into a fresh virtualenv outside the checkout (the
    dependencies, torch included, come from this environment's site-packages through a .pth
    file rather than a download), then write demo shards and fit the demo config by name."""
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    for folder in ("lightning_registers", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=CACHES)
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    wheel_command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    run([*wheel_command, "-q", "-w", tmp_path / "dist", source], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lightning_registers-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if "/configs/" in n}
    assert "lightning_registers/configs/demo/supervised.yaml" in shipped
    assert len([n for n in shipped if n.endswith(".yaml")]) == len(config_names())

    env = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--without-pip", env], cwd=tmp_path)
    python = env / "bin" / "python"
    site = Path(
        run(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path
        ).strip()
    )
    (site / "borrowed_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(
        [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel],
        cwd=tmp_path,
    )

    work = tmp_path / "work"
    work.mkdir()
    command = env / "bin" / "lightning-registers"
    where = run(
        [python, "-c", "import lightning_registers; print(lightning_registers.__file__)"], cwd=work
    )
    assert Path(where.strip()).is_relative_to(site)
    assert "demo/supervised" in run([command, "configs", "list"], cwd=work).split()
    run([command, "shards", "demo", "--train", "96", "--val", "32", "--quiet"], cwd=work)
    run(
        [
            command,
            "fit",
            "--config",
            "demo/supervised",
            "--trainer.max_epochs",
            "1",
            "--trainer.callbacks",
            "[]",
            "--data.samples_per_epoch",
            "64",
            "--data.batch_size",
            "32",
            "--data.num_workers",
            "0",
            "--model.init_args.backbone.init_args.depth",
            "1",
        ],
        cwd=work,
    )
    (checkpoint,) = (work / "runs" / "demo_supervised" / "version_0" / "checkpoints").glob(
        "last.ckpt"
    )
    assert checkpoint.stat().st_size > 0

"""The demo configs, run as `make demo` runs them, learn (slow: minutes each; `-m slow`)."""

import pytest
from demo_run import ROOT

from lightning_registers.cli import lightning_main
from lightning_registers.data import write_demo_shards


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """The default demo shards (as `make demo` writes them) in a fresh working directory."""
    work = tmp_path_factory.mktemp("demo_run")
    write_demo_shards(work / "data" / "demo", progress=False)
    return work


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "metric", "at_least"),
    [("supervised", "val/top1", 0.4), ("clip", "val/zeroshot_top1", 0.3)],
)
def test_demo_config_learns_well_above_chance(config, metric, at_least, demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)
    cli = lightning_main(["fit", "--config", str(ROOT / "configs" / "demo" / f"{config}.yaml")])
    value = cli.trainer.callback_metrics[metric].item()
    assert value >= at_least, f"{metric} = {value:.3f} (chance 0.10)"


@pytest.mark.slow
def test_dino_demo_learns_above_chance_and_above_its_initialization(demo_dir, monkeypatch):
    monkeypatch.chdir(demo_dir)
    config = str(ROOT / "configs" / "demo" / "dino.yaml")
    before = lightning_main(["validate", "--config", config, "--trainer.logger=false"])
    at_init = before.trainer.callback_metrics["val/knn_top1"].item()
    cli = lightning_main(["fit", "--config", config])
    trained = cli.trainer.callback_metrics["val/knn_top1"].item()
    assert trained >= 0.4, f"k-NN top-1 = {trained:.3f} (chance 0.10)"
    assert trained >= at_init + 0.2, f"k-NN top-1 {trained:.3f} vs {at_init:.3f} at init"

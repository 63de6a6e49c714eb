"""Runs shared by the monitoring and the curves tests."""

from pathlib import Path

import pytest
from planted_runs import (
    MAX_STEPS,
    SWITCH_STEP,
    artifact_backbone,
    fit,
    switched_on_at,
    write_scenes,
)

from lightning_registers.callbacks import ArtifactEmergence, TokenNormMonitor


@pytest.fixture(scope="session")
def switched_on_runs(tmp_path_factory) -> dict[str, Path]:
    """Two 12-step runs (checks every 2 steps, patience 2) whose planted tokens switch on after
    step 4: ``artifacts`` (from block 1 on the background) and ``look_alikes`` (from block 0
    on the object); their run folders by name."""
    root = tmp_path_factory.mktemp("switched")
    scenes = write_scenes(root / "scenes")
    runs = {}
    for name, on_background in (("artifacts", True), ("look_alikes", False)):
        backbone = artifact_backbone(on_background)
        callbacks = [
            switched_on_at(backbone, SWITCH_STEP),
            TokenNormMonitor(every_n_steps=2, probe_size=8),
            ArtifactEmergence(patience=2),
        ]
        trainer = fit(
            root, scenes, scenes, backbone, callbacks, MAX_STEPS, image_size=64, name=name
        )
        runs[name] = Path(trainer.log_dir)
    return runs

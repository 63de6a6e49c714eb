"""A real TensorBoard process on a free loopback port, and a short monitored demo run for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from demo_run import demo_datamodule, quiet_trainer
from lightning.pytorch.loggers import TensorBoardLogger
from ports import free_port

from lightning_registers.callbacks import (
    ArtifactEmergence,
    AttentionMapMonitor,
    TokenNormMonitor,
)
from lightning_registers.models import RegisterViT
from lightning_registers.objectives import SupervisedModule

RUN = "demo/version_0"
CHECKS = [0, 2, 4, 6]
LAYERS = ["block00", "block01", "output"]


def monitored_run(root: Path, demo_shards: Path) -> Path:
    """Six supervised steps of a 2-block ViT with 2 registers on the demo shards, the three
    monitors checking every 2 steps (``CHECKS``), logged to TensorBoard as ``root/RUN``."""
    backbone = RegisterViT(
        "vit_tiny",
        img_size=32,
        patch_size=8,
        num_registers=2,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )
    module = SupervisedModule(
        backbone, num_classes=10, image_size=32, lr=1e-3, warmup_epochs=0, optimizer="adamw"
    )
    callbacks = [
        TokenNormMonitor(every_n_steps=2, probe_size=8, n_images=2),
        AttentionMapMonitor(every_n_steps=2, n_images=2),
        ArtifactEmergence(patience=2),
    ]
    logger = TensorBoardLogger(root, name=RUN.split("/")[0])
    trainer = quiet_trainer(
        max_steps=CHECKS[-1],
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=demo_datamodule(demo_shards))
    return root


class TensorBoard:
    """The HTTP side of a running TensorBoard at ``url``."""

    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **query) -> bytes:
        """The body of ``GET path?query``."""
        address = f"{self.url}{path}"
        if query:
            address += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(address, timeout=30) as response:
            return response.read()

    def json(self, path: str, **query):
        """``get`` decoded as JSON."""
        return json.loads(self.get(path, **query))


@contextmanager
def tensorboard(
    logdir: Path, ready_tag: str, run: str = RUN, timeout: float = 60
) -> Iterator[TensorBoard]:
    """``tensorboard --logdir logdir`` on a free port, once it serves the scalar ``ready_tag``
    of ``run`` (it reads the event files in the background); stopped with its data server
    afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)]
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the data server it starts goes too
    )
    server = TensorBoard(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready_tag in server.json("/data/plugin/scalars/tags").get(run, {}):
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                output = log.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"tensorboard never served {ready_tag} of {run}: {output}")
            time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()

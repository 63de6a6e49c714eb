"""Checkpoints written atomically beside their final path.

Lightning writes a checkpoint file through a temporary file in the system temp directory and
moves it into place; across filesystems (node-local /tmp, a shared ``runs/``) that move is a
copy, and a job killed during it leaves a truncated checkpoint that its resumed run crashes on.
Here every temporary name lies in the checkpoint's own directory, so publishing is one rename:

- a file is written to ``.checkpoint-<token>``, synced, and renamed over its path;
- a sharded checkpoint (a directory, one file a rank) is written to ``.checkpoint-<token>/``;
  its path is a symbolic link to that directory, and publishing renames a new link over the
  old one (a directory cannot be renamed over a directory), then deletes the old directory.

A kill at any moment leaves the previous checkpoint or the new one at the path. What a kill
leaves behind is a ``.checkpoint-*`` entry that no link points to: removed at the start of the
next fit. The names hold no "hpc_ckpt_" and do not end in ``.ckpt``, so Lightning's search for
the last and the requeue checkpoints never takes them for checkpoints.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

TEMP_PREFIX = ".checkpoint-"


def temp_path(directory: str | Path) -> Path:
    """A fresh ``.checkpoint-<token>`` name in ``directory``."""
    return Path(directory) / f"{TEMP_PREFIX}{secrets.token_hex(8)}"


def sync_directory(directory: str | Path) -> None:
    """Make the entries of ``directory`` (renames included) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """``write(stream)`` into a temporary file beside ``path``, synced, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_path(path.parent)
    try:
        with open(temp, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def publish_directory(staged: str | Path, path: str | Path) -> None:
    """Make the complete directory ``staged`` (a ``temp_path`` beside ``path``) the checkpoint
    at ``path``: sync its files, point a new link at it and rename the link over ``path``, then
    delete the directory the previous link pointed to."""
    staged, path = Path(staged), Path(path)
    for entry in staged.iterdir():
        if entry.is_file():
            with open(entry, "rb") as stream:
                os.fsync(stream.fileno())
    sync_directory(staged)
    previous = _linked_directory(path)
    if path.is_dir() and not path.is_symlink():
        # A plain directory (not written here) cannot be replaced in one rename. It is moved
        # aside under a name that no clean-up removes, so a kill before the next rename leaves
        # it there, whole, though not at the path.
        previous = path.with_name(f"{path.name}.replaced")
        shutil.rmtree(previous, ignore_errors=True)
        path.rename(previous)
    link = temp_path(path.parent)
    os.symlink(staged.name, link)
    os.replace(link, path)
    sync_directory(path.parent)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def _linked_directory(path: Path) -> Path | None:
    """The ``.checkpoint-*`` directory beside ``path`` that the link ``path`` points to."""
    if not path.is_symlink():
        return None
    target = path.parent / os.readlink(path)
    return target if target.parent == path.parent and target.name.startswith(TEMP_PREFIX) else None


def remove_checkpoint(path: str | Path) -> None:
    """Delete the checkpoint at ``path``: a file, a directory, or a link and its directory
    (the link first, so a kill in between leaves a leftover, not a broken link)."""
    path = Path(path)
    if path.is_symlink():
        target = _linked_directory(path)
        path.unlink()
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def remove_leftovers(directory: str | Path) -> list[Path]:
    """Delete the ``.checkpoint-*`` entries of ``directory`` that no link in it points to
    (writes and replacements a kill interrupted); returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    entries = list(directory.iterdir())
    ours = [e for e in entries if e.name.startswith(TEMP_PREFIX)]
    # A temporary link (a publish killed before its rename) keeps nothing alive.
    linked = {os.readlink(e) for e in entries if e.is_symlink() and e not in ours}
    leftovers = [e for e in ours if e.name not in linked]
    for entry in leftovers:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return leftovers


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose local writes are atomic (``torch.save`` streamed
    into a temporary file beside the checkpoint, synced, renamed) and whose removals understand
    the linked sharded checkpoints of ``FSDP2Strategy``. Remote paths (fsspec URLs) go through
    Lightning's own code."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_file_atomically(path, lambda stream: torch.save(checkpoint, stream))

    def remove_checkpoint(self, path: str | Path) -> None:
        if not _is_local(path):
            return super().remove_checkpoint(path)
        remove_checkpoint(path)


def _is_local(path: str | Path) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


class AtomicCheckpoints(Callback):
    """Installs ``AtomicCheckpointIO`` where the strategy would use Lightning's default
    ``TorchCheckpointIO`` (a checkpoint IO the user configured is left alone), and at the start
    of a fit removes the leftovers of killed writes from the checkpoint directories and the run
    directory (where requeue checkpoints go). Every objective adds it."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        directories = {getattr(c, "dirpath", None) for c in trainer.checkpoint_callbacks}
        directories.add(trainer.default_root_dir)
        for directory in directories - {None}:
            if _is_local(directory):
                remove_leftovers(directory)

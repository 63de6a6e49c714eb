"""Run directories, ``runs/<experiment>/version_N/``, and the checkpoint a resumed run starts
from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from .objectives.safe_load import UnreadableCheckpointError

RUNS_DIR = "runs"


def run_dir(experiment: str, version: int, root: Path = Path(".")) -> Path:
    """``runs/<experiment>/version_N`` under ``root``."""
    return root / RUNS_DIR / experiment / f"version_{version}"


def run_versions(experiment: str, root: Path = Path(".")) -> list[int]:
    """N of every ``runs/<experiment>/version_N`` under ``root``."""
    runs = root / RUNS_DIR / experiment
    return [int(p.name[8:]) for p in runs.glob("version_*") if p.name[8:].isdigit()]


def run_version(ckpt_path: str | None, experiment: str) -> int | None:
    """N when ``ckpt_path`` lies in ``runs/<experiment>/version_N/``, else None."""
    if not ckpt_path:
        return None
    parts = Path(ckpt_path).resolve().parts
    base = Path(RUNS_DIR, experiment).resolve().parts
    if parts[: len(base)] == base and len(parts) > len(base):
        version = parts[len(base)]
        if version.startswith("version_") and version[8:].isdigit():
            return int(version[8:])
    return None


def run_checkpoints(run: Path) -> list[Path]:
    """The checkpoints of the run in directory ``run``, newest first: the requeue checkpoints
    ``hpc_ckpt_N.ckpt`` in it and every ``*.ckpt`` (file or sharded directory) in its
    ``checkpoints/``."""
    found = [*run.glob("hpc_ckpt_*.ckpt"), *(run / "checkpoints").glob("*.ckpt")]
    found = [path for path in found if path.exists()]  # not a link to a removed directory
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def resume_checkpoint(
    experiment: str, version: int | None, load: Callable[[Path], dict]
) -> tuple[int, Path, dict] | None:
    """What ``--ckpt_path last`` resumes: ``(version, path, checkpoint)`` of the newest
    checkpoint that ``load`` reads in run ``version``, by default the newest run that has a
    checkpoint (a directory without one, such as a dry run's, is no run to resume). A checkpoint
    that ``load`` refuses (ValueError: empty, truncated, needing code) is skipped with a warning
    naming it and the one used instead. None when no run has a checkpoint; an error naming each
    one when none loads."""
    versions = [version] if version is not None else sorted(run_versions(experiment), reverse=True)
    for candidate in versions:
        checkpoints = run_checkpoints(run_dir(experiment, candidate))
        if checkpoints:
            break
    else:
        return None
    failures = []
    for path in checkpoints:
        try:
            checkpoint = load(path)
        except ValueError as exn:  # unreadable, or needing code: never run it to resume
            failures.append(str(exn))
            continue
        for failure in failures:
            rank_zero_warn(f"{failure}: resuming from {path} instead")
        return candidate, path, checkpoint
    raise UnreadableCheckpointError(
        f"no checkpoint of {run_dir(experiment, candidate)} loads: {'; '.join(failures)}"
    )

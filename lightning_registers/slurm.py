"""``lightning-registers submit``: render an sbatch script into a run directory and submit it.

The script runs ``srun lightning-registers fit`` on ``--nodes`` nodes with one task per device
(``--ntasks-per-node``, and ``--cpus-per-task``, given to srun too: since Slurm 22.05 srun
does not inherit it; a task that dies ends the others, ``--kill-on-bad-exit``), asks Slurm for
SIGUSR1 90 s before the time limit and makes the job requeueable. On SIGUSR1 (from Slurm, or
``scancel --signal=USR1 --batch``, which the script forwards to the tasks) the tasks save a
checkpoint into the run directory after the current training step and requeue the job
(``objectives.requeue.SlurmRequeue``); the requeued job runs the same script,
which resumes from the newest of its checkpoints that loads (``--ckpt_path last``), in the
same run directory and TensorBoard run.

Every value is checked before anything is written (counts, the time and memory formats, no
control characters) and quoted where the script holds it: for sbatch's own parser in
``#SBATCH`` lines, for the shell elsewhere.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from .runs import run_dir, run_versions
from .shipped_configs import resolve_config

SCRIPT_NAME = "submit.sbatch"
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
FORMATS = {  # what sbatch reads, and how the error puts it
    "time": (
        r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE",
        "minutes, [hours:]minutes:seconds or days-hours[:minutes[:seconds]]",
    ),
    "mem": (r"\d+[KMGTkmgt]?", "megabytes, or a number with K, M, G or T"),
}

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
{optional}#SBATCH --signal=B:USR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={log}
#SBATCH --error={log}
# Rendered by `lightning-registers submit`; rerun as is by Slurm when the job is requeued.
set -u
cd {workdir}
RUN_DIR={run_dir}
RESUME=""
for CHECKPOINT in "$RUN_DIR"/hpc_ckpt_*.ckpt "$RUN_DIR"/checkpoints/*.ckpt; do
  # A requeue or epoch checkpoint exists: fit resumes from the newest of them that loads.
  if [ -e "$CHECKPOINT" ]; then RESUME="--ckpt_path=last"; fi
done
echo "job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, on $(hostname): ${{RESUME:-fit}}"
# Forward the requeue signal to the tasks: they save a checkpoint after this step and requeue.
trap 'echo "SIGUSR1: forwarding to the tasks"; kill -USR1 "$SRUN_PID" 2>/dev/null' USR1
# One task per device on every node (srun does not inherit --cpus-per-task); if one task dies,
# srun ends the others at once instead of leaving them blocked in a collective until its timeout.
srun --nodes={nodes} --ntasks-per-node={tasks_per_node} --cpus-per-task={cpus_per_task} \\
  --kill-on-bad-exit=1 {fit} $RESUME &
SRUN_PID=$!
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
wait "$SRUN_PID"
"""


def experiment_name(configs: list[str]) -> str:
    """The ``experiment`` of the last config file that sets one (else "default")."""
    name = "default"
    for config in configs:
        data = yaml.safe_load(Path(config).read_text()) or {}
        name = data.get("experiment", name)
    return name


def next_run_dir(experiment: str, root: Path) -> tuple[int, Path]:
    """Reserve ``runs/<experiment>/version_N`` (the next free N) by creating it."""
    version = max(run_versions(experiment, root), default=-1) + 1
    path = run_dir(experiment, version, root)
    path.mkdir(parents=True)
    return version, path


def sbatch_quote(value: str) -> str:
    """``value`` as one argument of an ``#SBATCH`` line: sbatch reads those lines itself, where
    a backslash escapes the next character even inside quotes (unlike the shell)."""
    if re.fullmatch(r"[\w@%+=:,./-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(opts: argparse.Namespace, fit_args: list[str], version: int, run_dir: Path) -> str:
    """The sbatch script for ``opts`` (the submit options) writing to ``run_dir``."""
    devices = opts.devices or opts.gpus_per_node or 1
    optional = []
    if opts.gpus_per_node:
        optional.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    for flag in ("mem", "time", "partition", "account", "qos"):
        value = getattr(opts, flag)
        if value:
            optional.append(f"#SBATCH --{flag}={sbatch_quote(value)}")
    experiment = opts.experiment or experiment_name(opts.config)
    fit = [
        "lightning-registers",
        "fit",
        *[arg for config in opts.config for arg in ("--config", str(Path(config).resolve()))],
        f"--experiment={experiment}",
        f"--version={version}",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.num_nodes={opts.nodes}",
        f"--trainer.devices={devices}",
        *([] if opts.gpus_per_node else ["--trainer.accelerator=cpu"]),
        *fit_args,
    ]
    return TEMPLATE.format(
        job_name=sbatch_quote(opts.job_name or experiment),
        nodes=opts.nodes,
        tasks_per_node=devices,
        cpus_per_task=opts.cpus_per_task,
        optional="".join(f"{line}\n" for line in optional),
        log=sbatch_quote(f"{run_dir}/slurm-%j.out"),
        run_dir=shlex.quote(str(run_dir)),
        workdir=shlex.quote(str(Path.cwd())),
        fit=" ".join(shlex.quote(arg) for arg in fit),
    )


def check_options(opts: argparse.Namespace, fit_args: list[str], fail) -> None:
    """Call ``fail(message)`` on the first option sbatch would reject or misread: a count out
    of range, a time or memory Slurm does not read, a control character in any value (a
    newline would start a new line of the script)."""
    for flag, least in (("nodes", 1), ("gpus_per_node", 0), ("devices", 1), ("cpus_per_task", 1)):
        value = getattr(opts, flag)
        if value is not None and value < least:
            fail(f"--{flag.replace('_', '-')} must be >= {least}, got {value}")
    for flag, value in [*vars(opts).items(), ("fit argument", fit_args)]:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and CONTROL.search(item):
                fail(f"--{flag.replace('_', '-')}: control character in {item!r}")
    for flag, (pattern, form) in FORMATS.items():
        value = getattr(opts, flag)
        if value and not re.fullmatch(pattern, value):
            fail(f"--{flag}: {value!r} is not a Slurm {flag} ({form})")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="lightning-registers submit",
        description="Render an sbatch script for `lightning-registers fit` into a new run "
        "directory, print it and submit it. Arguments after the options go to `fit` "
        "(e.g. --trainer.max_epochs 10).",
    )
    p.add_argument("--config", action="append", required=True, help="fit config (repeatable)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU job")
    p.add_argument(
        "--devices", type=int, default=None, help="tasks per node (default: gpus-per-node, or 1)"
    )
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--mem", default=None, help="memory per node, e.g. 200G")
    p.add_argument("--time", default=None, help="time limit, e.g. 2-00:00:00")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--job-name", default=None, help="default: the experiment name")
    p.add_argument("--experiment", default=None, help="default: the configs' experiment")
    p.add_argument("--dry-run", action="store_true", help="write and print the script only")
    return p


def submit_main(args: list[str]) -> str | None:
    """``lightning-registers submit ...``; returns the job id (None for a dry run)."""
    p = parser()
    opts, fit_args = p.parse_known_args(args)
    check_options(opts, fit_args, p.error)
    opts.config = [resolve_config(config) for config in opts.config]
    experiment = opts.experiment or experiment_name(opts.config)
    version, run_dir = next_run_dir(experiment, Path.cwd())
    script = run_dir / SCRIPT_NAME
    script.write_text(render(opts, fit_args, version, run_dir.resolve()))
    print(script.read_text())
    print(f"sbatch script: {script}")
    if opts.dry_run:
        return None
    result = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        print(f"sbatch failed: {result.stderr.strip()}", file=sys.stderr)
        sys.exit(result.returncode)
    job_id = re.split(r"[;\s]", result.stdout.strip())[0]
    print(f"submitted job {job_id}; run directory {run_dir}")
    return job_id

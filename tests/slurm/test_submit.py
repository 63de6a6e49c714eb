"""`lightning-registers submit`: options are checked and every value quoted for sbatch and the
shell; against a real one-node Slurm cluster, a 2-task CPU DDP job of the demo config runs, and
a job signalled with USR1 requeues and continues its global step."""

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cluster import SlurmCluster
from demo_run import ROOT, demo_data, write_yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_registers.slurm import submit_main

DEMO = str(ROOT / "configs/demo/supervised.yaml")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(
    work: Path, slurm, demo_shards, samples: int, epochs: int, *extra, experiment="demo_supervised"
) -> tuple[str, Path]:
    override = {
        "model": {"init_args": {"backbone": {"init_args": {
            "embed_dim": 32, "depth": 2, "num_heads": 2}}}},
        "data": demo_data(demo_shards, samples_per_epoch=samples),
    }  # fmt: skip
    path = write_yaml(work / "override.yaml", override)
    command = [
        sys.executable, "-m", "lightning_registers.cli", "submit",
        "--config", str(ROOT / "configs/demo/supervised.yaml"), "--config", str(path),
        "--nodes", "1", "--devices", "2", "--cpus-per-task", "1", *extra,
        "--trainer.strategy=ddp", f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    env = {**slurm.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    job_id = result.stdout.strip().splitlines()[-1].split()[2].rstrip(";")
    return job_id, work / "runs" / experiment / "version_0"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := predicate():
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def job_log(run: Path) -> str:
    return "".join(p.read_text() for p in run.glob("slurm-*.out"))


def test_dry_run_writes_the_script_and_submits_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lightning_registers.cli", "submit", "--config",
         "demo/supervised", "--nodes", "2", "--gpus-per-node", "8",
         "--time", "1-00:00:00", "--partition", "gpu", "--account", "vision", "--qos", "high",
         "--mem", "400G", "--dry-run", "--trainer.max_epochs", "5"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    script = (tmp_path / "runs/demo_supervised/version_0/submit.sbatch").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=B:USR1@90",
                 "--requeue", "--time=1-00:00:00", "--partition=gpu", "--account=vision",
                 "--qos=high", "--mem=400G"):  # fmt: skip
        assert f"#SBATCH {line}" in script, line
    srun = "srun --nodes=2 --ntasks-per-node=8 --cpus-per-task=8 \\\n  --kill-on-bad-exit=1 "
    assert f"{srun}lightning-registers fit" in script
    assert "--trainer.devices=8 --trainer.max_epochs 5" in script and "--version=0" in script
    assert f"--config {ROOT / 'configs/demo/supervised.yaml'}" in script  # a shipped name
    assert "submitted job" not in result.stdout


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--nodes", "0", "--nodes must be >= 1, got 0"),
        ("--nodes", "-2", "--nodes must be >= 1, got -2"),
        ("--devices", "0", "--devices must be >= 1"),
        ("--gpus-per-node", "-1", "--gpus-per-node must be >= 0"),
        ("--cpus-per-task", "0", "--cpus-per-task must be >= 1"),
        ("--time", "2days", "--time: '2days' is not a Slurm time"),
        ("--time", "1:00:00:00", "is not a Slurm time"),
        ("--mem", "lots", "--mem: 'lots' is not a Slurm mem"),
        ("--mem", "400G\n#SBATCH --qos=high", "--mem: control character"),
        ("--partition", "gpu\rx", "--partition: control character"),
        ("--job-name", "a\x1bb", "--job-name: control character"),
    ],
)
def test_bad_options_fail_in_one_line_naming_the_option_and_write_nothing(
    option, value, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        submit_main(["--config", DEMO, option, value, "--dry-run"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "runs").exists()


def test_every_value_reaches_sbatch_and_the_shell_as_given(tmp_path, monkeypatch, capsys):
    """Directives as sbatch splits them (quotes group, a backslash escapes the next character,
    as in the shell's double quotes); the fit command as bash runs it, through a stub srun."""
    monkeypatch.chdir(tmp_path)
    odd = {"--partition": "gpu a", "--account": "lab's", "--qos": 'say "hi" \\ #1',
           "--job-name": "my run", "--experiment": "exp $HOME"}  # fmt: skip
    args = [arg for item in odd.items() for arg in item]
    submit_main(["--config", DEMO, *args, "--time", "1-12", "--dry-run", "--x.y", "a b"])
    capsys.readouterr()
    run = tmp_path / "runs" / "exp $HOME" / "version_0"
    script = (run / "submit.sbatch").read_text()
    directives = [shlex.split(line[len("#SBATCH ") :]) for line in script.splitlines()
                  if line.startswith("#SBATCH ")]  # fmt: skip
    assert all(len(tokens) == 1 for tokens in directives), directives
    given = dict(tokens[0].partition("=")[::2] for tokens in directives)
    for option in ("--partition", "--account", "--qos", "--job-name"):
        assert given[option] == odd[option]
    assert given["--time"] == "1-12" and given["--output"] == f"{run.resolve()}/slurm-%j.out"

    stub = tmp_path / "bin" / "srun"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {shlex.quote(str(tmp_path / "argv"))}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"}
    subprocess.run(["bash", str(run / "submit.sbatch")], env=env, check=True, capture_output=True)
    argv = (tmp_path / "argv").read_text().splitlines()
    srun_options = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=8", "--kill-on-bad-exit=1"]
    assert argv[:6] == [*srun_options, "lightning-registers", "fit"]
    assert "--experiment=exp $HOME" in argv and argv[-2:] == ["--x.y", "a b"]
    assert f"--trainer.default_root_dir={run.resolve()}" in argv


def test_two_task_ddp_job_trains_and_leaves_events_and_checkpoint(tmp_path, slurm, demo_shards):
    # A name with a space: the job name and the log path are quoted in the #SBATCH lines.
    job_id, run = submit(
        tmp_path, slurm, demo_shards, 32, 2, "--experiment", "tiny ddp", experiment="tiny ddp"
    )
    assert "JobName=tiny ddp\n" in slurm.run("scontrol", "show", "job", job_id).stdout
    state = wait_for(
        lambda: (s := slurm.job_state(job_id)) in ("COMPLETED", "FAILED", "CANCELLED") and s,
        300, f"job {job_id}",
    )  # fmt: skip
    assert state == "COMPLETED", job_log(run)[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8  # 2 epochs of 32 samples over 2 tasks of batch 4
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    assert [s.step for s in events.Scalars("val/top1")] == [3, 7]
    assert "MEMBER: 2/2" in job_log(run)  # Lightning saw both Slurm tasks as ranks


def test_usr1_requeues_the_job_and_the_global_step_continues(tmp_path, slurm, demo_shards):
    job_id, run = submit(tmp_path, slurm, demo_shards, samples=400, epochs=3)
    wait_for(lambda: slurm.job_state(job_id) == "RUNNING", 120, "the job to run")
    wait_for(lambda: (run / "checkpoints" / "last.ckpt").exists(), 240, "the first epoch")
    slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    slurm.release_requeued(job_id)
    wait_for(lambda: "restart 1" in job_log(run), 120, "the requeued job to start")
    state = wait_for(
        lambda: (s := slurm.job_state(job_id)) in ("COMPLETED", "FAILED", "CANCELLED") and s,
        400, f"job {job_id} to finish",
    )  # fmt: skip
    log = job_log(run)
    assert state == "COMPLETED", log[-3000:]
    assert "SIGUSR1" in log and "requeue signal: saving" in log  # at a step boundary
    assert not (run.parent / "version_1").exists()  # the same run directory
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3 * 50  # 3 epochs of 400 samples / (2 tasks x 4)
    # The requeued job writes a second event file into the same run; its steps go on.
    first, second = sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    steps = []
    for path in (first, second):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        steps.append([s.step for s in events.Scalars("train/loss")])
    assert steps[1][0] >= 50 - 1  # after at least the first epoch, not from 0
    assert steps[1][-1] == 3 * 50 - 1

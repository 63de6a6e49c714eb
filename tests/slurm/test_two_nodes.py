"""`lightning-registers` jobs across the two nodes of a Slurm cluster emulated on this machine
(``two_nodes.TwoNodeCluster``, started once for the module; needs root): DDP against the same
run on one node, FSDP2 with DINO, CLIP's gathered loss, the data split over nodes and workers,
and a requeue and a killed task of a multi-node job. Tiny models and few steps; the three
monitors are on in every job and must log once, from rank 0 on node1."""

import os
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import chdir
from pathlib import Path
from unittest import mock

import pytest
import torch
from demo_run import ROOT, demo_data, write_yaml
from recorder import probe_images
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_scale_out import PER_OBJECTIVE, TINY_MODEL
from two_nodes import TwoNodeCluster

from lightning_registers.cli import export_main
from lightning_registers.data import write_demo_shards
from lightning_registers.models import RegisterViT
from lightning_registers.slurm import submit_main

BIN = Path(sys.executable).parent
DDP = [ROOT / "configs/trainer/ddp.yaml", ROOT / "configs/trainer/slurm.yaml"]
FSDP = [ROOT / "configs/trainer/fsdp.yaml", ROOT / "configs/trainer/slurm.yaml"]
MONITORS = [
    {"class_path": "lightning_registers.callbacks.TokenNormMonitor",
     "init_args": {"every_n_steps": 6, "probe_size": 4}},
    {"class_path": "lightning_registers.callbacks.AttentionMapMonitor",
     "init_args": {"every_n_steps": 6, "n_images": 2, "save_png": True}},
    {"class_path": "lightning_registers.callbacks.ArtifactEmergence"},
]  # fmt: skip
DISTRIBUTED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = TwoNodeCluster(tmp_path_factory.mktemp("two_nodes")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """48 training scenes as 8 shards ("many": at least ranks x workers) and as 1 ("one":
    fewer shards than ranks); 12 validation scenes, which split evenly over the ranks (under
    FSDP2 every forward is a collective: ranks must validate the same number of batches)."""
    root = tmp_path_factory.mktemp("two_node_shards")
    for name, per_shard in (("many", 6), ("one", 48)):
        write_demo_shards(root / name, train=48, val=12, size=32, seed=0, maxcount=per_shard,
                          progress=False)  # fmt: skip
    return {"many": root / "many", "one": root / "one"}


def job_config(work: Path, objective: str, data_root: Path, pace: float = 0.0, **data) -> Path:
    """A tiny version of the demo config of ``objective`` with the monitors and a
    ``probes.RecordRank`` writing into ``work/seen``. One sample in the shuffle buffer: an
    epoch of the dataset's size is then exactly one pass over it (a larger buffer mixes the
    end of one pass with the start of the next)."""
    (work / "seen").mkdir(parents=True, exist_ok=True)
    record = {"class_path": "probes.RecordRank",
              "init_args": {"out": str(work / "seen"), "pace": pace}}  # fmt: skip
    if objective == "dino":  # sharded weights: record the exported backbone's output instead
        record = {"class_path": "recorder.RecordOutputs",
                  "init_args": {"path": str(work / "seen" / "output.pt")}}  # fmt: skip
    config = {
        "trainer": {"callbacks": [*MONITORS, record]},
        "model": {"init_args": {**TINY_MODEL, **PER_OBJECTIVE[objective]}},
        "data": demo_data(
            data_root, **{"num_workers": 2, "samples_per_epoch": 48, "shuffle_buffer": 1, **data}
        ),
    }
    return write_yaml(work / "tiny.yaml", config)


def job_env(cluster) -> dict[str, str]:
    """The client environment of ``cluster``, with this project's programs and the tests'
    callbacks, and without a rank or address of an earlier distributed run."""
    env = {key: value for key, value in cluster.env.items() if key not in DISTRIBUTED}
    paths = [str(ROOT / "tests" / "slurm"), str(ROOT / "tests")]
    return {**env, "PATH": f"{BIN}{os.pathsep}{env['PATH']}", "PYTHONPATH": os.pathsep.join(paths)}


def submit(cluster, work: Path, configs, *fit_args: str, nodes=2, devices=1) -> tuple[str, Path]:
    """``lightning-registers submit`` of ``configs`` from ``work`` (its function, in this
    process, with the job's environment): (job id, run directory)."""
    args = [
        *(arg for config in configs for arg in ("--config", str(config))),
        "--nodes", str(nodes), "--devices", str(devices), "--cpus-per-task", "1",
        "--experiment", "two", "--trainer.enable_progress_bar=false",
        "--trainer.log_every_n_steps=1", *fit_args,
    ]  # fmt: skip
    with chdir(work), mock.patch.dict(os.environ, job_env(cluster), clear=True):
        job_id = submit_main(args)
    return job_id, work / "runs" / "two" / "version_0"


def job_log(run: Path) -> str:
    return "".join(p.read_text() for p in sorted(run.glob("slurm-*.out")))


def finish(cluster, job_id: str, run: Path, timeout: float = 400) -> str:
    """The final state of ``job_id`` (failing the test if it does not end in ``timeout`` s)."""
    try:
        return cluster.wait_for(
            lambda: (s := cluster.job_state(job_id)) in DONE and s, timeout, f"job {job_id}"
        )
    except RuntimeError as exn:
        raise AssertionError(f"{exn}\njob log:\n{job_log(run)[-3000:]}") from None


def seen(work: Path) -> list[list[dict]]:
    """What each rank recorded, by global rank: a list with one entry per run of the job."""
    files = sorted((work / "seen").glob("rank*.pt"), key=lambda p: int(p.stem[4:]))
    return [torch.load(path) for path in files]


def events(path: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def assert_monitored_once(run: Path, starts: int = 1) -> None:
    """One event file per start of the job, written on node1 (global rank 0), in which every
    monitor check is logged once; the attention figures of the last start, once per check."""
    files = sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(files) == starts and all(".node1." in path.name for path in files), files
    for path in files:
        logged = events(path)
        present = [tag for tag in logged.Tags()["scalars"] if tag.endswith("/present")]
        assert present, logged.Tags()["scalars"]
        checks = [s.step for s in logged.Scalars(present[0])]
        assert checks and len(set(checks)) == len(checks), checks
        name = present[0].split("/")[1]
        assert [i.step for i in logged.Images(f"attention/{name}/mean")] == checks
    figures = (run / "figures").glob(f"attention_mean_{name}_step*.png")
    assert set(checks) <= {int(p.stem.rsplit("step", 1)[1]) for p in figures}


def shard_keys(data_root: Path) -> list[str]:
    """Every training sample key, read from the tars themselves."""
    keys = []
    for shard in sorted((data_root / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys += sorted({name.split(".")[0] for name in tar.getnames()})
    return keys


@pytest.fixture(scope="module")
def jobs(cluster, shards, tmp_path_factory) -> dict[str, tuple[Path, str, Path]]:
    """The independent jobs, submitted at once: (work folder, job id, run directory) by name.
    One epoch each, of the tiny demo configs: supervised under DDP on 2 nodes x 1 process and
    on 1 node x 2 processes, 2 data workers a rank on the 8-shard set; CLIP on 2 nodes on the
    1-shard set; DINO under FSDP2 on 2 nodes."""
    plans = {
        "ddp_two_nodes": (DDP, "supervised", "many", 2, 1, []),
        "ddp_one_node": (DDP, "supervised", "many", 1, 2, []),
        "clip": (DDP, "clip", "one", 2, 1, []),
        "fsdp": (FSDP, "dino", "many", 2, 1, [
            "--trainer.strategy.init_args.process_group_backend=gloo"]),
    }  # fmt: skip
    started = {}
    for name, (strategy, objective, data, nodes, devices, extra) in plans.items():
        work = tmp_path_factory.mktemp(name)
        configs = [*strategy, ROOT / f"configs/demo/{objective}.yaml",
                   job_config(work, objective, shards[data])]  # fmt: skip
        job_id, run = submit(cluster, work, configs, "--trainer.max_epochs=1", *extra,
                             nodes=nodes, devices=devices)  # fmt: skip
        started[name] = (work, job_id, run)
    return started


def completed(cluster, jobs, *names: str) -> list[Path]:
    """The work folders of jobs ``names``, once each has completed."""
    for name in names:
        _, job_id, run = jobs[name]
        assert finish(cluster, job_id, run) == "COMPLETED", job_log(run)[-3000:]
    return [jobs[name][0] for name in names]


def test_ddp_over_two_nodes_ends_with_equal_weights_and_the_losses_of_one_node(cluster, jobs):
    work, reference_work = completed(cluster, jobs, "ddp_two_nodes", "ddp_one_node")
    two, one = seen(work), seen(reference_work)
    assert len(two) == len(one) == 2 and two[0][0]["world_size"] == 2
    for name, weights in two[0][0]["weights"].items():
        torch.testing.assert_close(two[1][0]["weights"][name], weights, rtol=0, atol=0)
    for rank in (0, 1):  # the same global batch, split the same way: the same losses
        steps, losses = zip(*two[rank][0]["losses"], strict=True)
        assert list(steps) == list(range(1, 7))  # 48 samples / (2 ranks x 4)
        reference = [loss for _, loss in one[rank][0]["losses"]]
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference))
    assert_monitored_once(work / "runs" / "two" / "version_0")
    log = job_log(work / "runs" / "two" / "version_0")
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log


def test_clip_logits_across_nodes_cover_both_nodes_samples(cluster, jobs):
    """open_clip's local loss: each rank's 4 images against the 8 texts of both nodes (and its
    texts against their images), as computed from the features each rank recorded."""
    (work,) = completed(cluster, jobs, "clip")
    ranks = [runs[0]["clip"] for runs in seen(work)]
    assert len(ranks) == 2
    images = torch.cat([rank["image"] for rank in ranks])
    texts = torch.cat([rank["text"] for rank in ranks])
    for rank in ranks:
        per_image, per_text = rank["logits"]
        assert per_image.shape == per_text.shape == (4, 8)  # the global batch in the columns
        torch.testing.assert_close(per_image, rank["scale"] * rank["image"] @ texts.T)
        torch.testing.assert_close(per_text, rank["scale"] * rank["text"] @ images.T)
    assert_monitored_once(work / "runs" / "two" / "version_0")


@pytest.mark.parametrize("layout, job", [("many", "ddp_two_nodes"), ("one", "clip")])
def test_an_epoch_reads_every_sample_once_across_nodes_and_workers(
    layout, job, cluster, jobs, shards
):
    """8 shards over 2 ranks x 2 workers: each (rank, worker) reads its own 2 shards. 1 shard
    (fewer than ranks): every (rank, worker) reads it and keeps every 4th sample."""
    (work,) = completed(cluster, jobs, job)
    per_rank = [runs[0]["keys"][0] for runs in seen(work)]
    assert [len(keys) for keys in per_rank] == [24, 24]
    everything = [key for keys in per_rank for key in keys]
    assert len(set(everything)) == len(everything)  # no sample twice, within or across nodes
    assert sorted(everything) == sorted(shard_keys(shards[layout]))  # none lost


def test_fsdp2_dino_across_nodes_writes_a_sharded_checkpoint_that_exports(cluster, jobs):
    (work,) = completed(cluster, jobs, "fsdp")
    run = work / "runs" / "two" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # a shard from each node
    exported = work / "backbone.pt"
    export_main([str(last), "--out", str(exported)])  # in this process, without a process group
    saved = torch.load(exported, weights_only=True)
    backbone = RegisterViT(**saved["config"]).eval()
    backbone.load_state_dict(saved["state_dict"])
    with torch.no_grad():  # the teacher as the job saw it at the end of training
        expected = torch.load(work / "seen" / "output.pt")["output"]
        torch.testing.assert_close(backbone(probe_images()), expected)
    assert_monitored_once(run)


def node_tasks(cluster, node: str) -> list[int]:
    """PIDs of the training tasks that Slurm started on ``node`` (children of slurmstepd)."""
    pids = subprocess.run(["ip", "netns", "pids", cluster.netns(node)], capture_output=True,
                          text=True, timeout=10).stdout.split()  # fmt: skip
    tasks = []
    for pid in pids:
        try:
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            launcher = Path(f"/proc/{parent}/comm").read_text().strip()
        except OSError:
            continue
        if b"lightning-registers\0fit" in command and launcher == "slurmstepd":
            tasks.append(int(pid))
    return tasks


def saved_step(checkpoint: Path) -> int | None:
    """The global step of ``checkpoint``, None while it cannot be read."""
    try:
        return torch.load(checkpoint, weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError):
        return None


def logged_steps(path: Path) -> list[int]:
    return [s.step for s in events(path).Scalars("train/loss")]


def test_multi_node_job_requeues_on_usr1_and_resumes_after_a_killed_task(cluster, shards, tmp_path):
    """USR1 -> one hpc_ckpt -> requeued -> resumed; then one node's task SIGKILLed mid-epoch
    -> the job fails within a bounded time -> resubmitted, it resumes from the newest
    checkpoint. 3 epochs of 6 steps, each step stretched to 0.5 s."""
    config = job_config(tmp_path, "supervised", shards["many"], pace=0.5, num_workers=0)
    configs = [*DDP, ROOT / "configs/demo/supervised.yaml", config]
    job_id, run = submit(cluster, tmp_path, configs, "--trainer.max_epochs=3")
    checkpoints = run / "checkpoints"
    cluster.wait_for(lambda: (checkpoints / "last.ckpt").exists(), 240, "the first epoch")
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    cluster.release_requeued(job_id)
    cluster.wait_for(lambda: "restart 1" in job_log(run), 120, "the requeued job")
    assert [p.name for p in run.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    requeue_step = saved_step(run / "hpc_ckpt_1.ckpt")
    assert 6 <= requeue_step < 12  # in epoch 2

    # The requeued job: once epoch 2 has ended (last.ckpt at step 12), kill node2's task in
    # epoch 3 (3 s of paced steps).
    cluster.wait_for(lambda: saved_step(checkpoints / "last.ckpt") == 12, 240, "epoch 2's end")
    (task,) = node_tasks(cluster, "node2")
    os.kill(task, signal.SIGKILL)
    killed = time.time()
    assert finish(cluster, job_id, run, timeout=120) == "FAILED"
    assert time.time() - killed < 60 and not node_tasks(cluster, "node1")  # no task left over
    assert saved_step(checkpoints / "last.ckpt") == 12  # the newest checkpoint: epoch 2's end

    resubmitted = subprocess.run(["sbatch", "--parsable", str(run / "submit.sbatch")],
                                 env=job_env(cluster), capture_output=True, text=True,
                                 check=True, timeout=30).stdout.strip()  # fmt: skip
    assert finish(cluster, resubmitted, run) == "COMPLETED", job_log(run)[-3000:]
    assert saved_step(checkpoints / "last.ckpt") == 18
    first, second, third = sorted(run.glob("events.out.tfevents.*"), key=os.path.getmtime)
    assert logged_steps(first)[0] == 0 and logged_steps(second)[0] == requeue_step
    assert logged_steps(third) == list(range(12, 18))  # the resubmitted job, from epoch 3
    assert_monitored_once(run, starts=3)

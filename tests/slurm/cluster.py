"""Throwaway Slurm clusters for the tests, from Debian's packages (installed when absent; needs
root, as in CI). ``SlurmCluster`` is one node on loopback ports; ``two_nodes.TwoNodeCluster``
builds on it. Each cluster runs its own munged (private socket and key) and records what it
started, so that nothing is shared with the host's Slurm or another test cluster, and a later
run removes what a killed one left behind (``Leftovers``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ports import free_port

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "iproute2"]
REGISTRY = Path("/run/lightning-registers-test-clusters")


def install() -> None:
    """apt-get the Slurm daemons, client, munge and ip (two_nodes) when one is missing."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged", "ip")):
        return
    if os.geteuid() != 0:
        raise RuntimeError("installing Slurm needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["update", "-q"], ["install", "-y", "-q", *PACKAGES]):
        subprocess.run(["apt-get", *command], check=True, env=env, capture_output=True, timeout=900)


def _stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (state first), None if there is no such
    process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), None if it does not exist:
    with the PID it names one process, whatever PIDs the system reuses later."""
    stat = _stat(pid)
    return stat[19] if stat else None


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (reaping it first if it is an exited child of this process)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def stop_process(pid: int, mark: str, grace: float = 10.0) -> None:
    """SIGTERM process ``pid`` if its command line holds ``mark`` (so a PID reused by another
    program is left alone), then SIGKILL it after ``grace`` seconds."""
    try:
        if mark not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            return
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.time() + grace
    while _running(pid):
        if time.time() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                return
            deadline = float("inf")
        time.sleep(0.1)


class Leftovers:
    """What a test cluster made on this machine, in a file under ``REGISTRY`` until it is gone:
    the daemons' PIDs and, for ``two_nodes``, network namespaces and links. A cluster that starts
    first removes every record whose owner (the test process, by PID and start time) is dead."""

    def __init__(self, tag: str, root: Path) -> None:
        self.path = REGISTRY / f"{tag}.json"
        self.record = {"owner": os.getpid(), "owner_start": _start_time(os.getpid()),
                       "root": str(root), "pids": [], "netns": [], "links": []}  # fmt: skip

    def add(self, kind: str, value) -> None:
        """Note ``value`` under ``kind`` ("pids", "netns" or "links") before it is made."""
        self.record[kind].append(value)
        REGISTRY.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps(self.record))
        temp.replace(self.path)

    def remove(self) -> None:
        """Undo everything recorded, in reverse order of making, and forget the record."""
        remove_record(self.record)
        self.path.unlink(missing_ok=True)

    @staticmethod
    def remove_orphans() -> None:
        """Undo the records of test processes that died without cleaning up."""
        for path in sorted(REGISTRY.glob("*.json")) if REGISTRY.is_dir() else []:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if _start_time(record["owner"]) != record["owner_start"]:
                remove_record(record)
                path.unlink(missing_ok=True)


def remove_record(record: dict) -> None:
    """Stop the recorded daemons and whatever still runs in the recorded namespaces, then
    delete the namespaces and links (idempotent: what is gone already is skipped)."""
    for pid in reversed(record["pids"]):
        stop_process(pid, record["root"])
    for netns in record["netns"]:
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        for pid in pids.stdout.split():  # job steps and tasks left in the node
            stop_process(int(pid), "", grace=2.0)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=10)
    for link in reversed(record["links"]):
        subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=10)


class SlurmCluster:
    """A Slurm cluster configured in ``root``: a private munged, slurmctld and a slurmd per node;
    ``env`` points clients at it. This one is a single node on this host's loopback; subclasses
    change where the daemons run (``controller``, ``nodes``, ``prefix``, ``make_network``)."""

    name = "lrtest"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.tag = f"{os.getpid()}-{root.name}"
        self.leftovers = Leftovers(self.tag, root)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    def controller(self) -> tuple[str, str]:
        """(hostname, address) of slurmctld."""
        return socket.gethostname().split(".")[0], "127.0.0.1"

    def nodes(self) -> list[tuple[str, str]]:
        """(name, address) of each node."""
        return [self.controller()]

    def prefix(self, host: str) -> list[str]:
        """The command that runs a daemon as ``host`` (a node name, or the controller's)."""
        return []

    def make_network(self) -> None:
        """Make what the nodes need before their daemons start."""

    def write_conf(self) -> None:
        for sub in ("state", "log", "munge", *(f"spool/{name}" for name, _ in self.nodes())):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host, address = self.controller()
        names = ",".join(name for name, _ in self.nodes())
        lines = [
            f"ClusterName={self.name}",
            f"SlurmctldHost={host}({address})",
            f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.%n.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobRequeue=1",
            "MinJobAge=3600",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "KillWait=5",
            *(
                f"NodeName={name} NodeAddr={address} CPUs={os.cpu_count() or 2} State=UNKNOWN"
                for name, address in self.nodes()
            ),
            f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=FORCE",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def spawn(self, name: str, command: list[str]) -> None:
        """Start daemon ``command`` in its own session (a test's Ctrl-C does not reach it), its
        output in ``log/<name>.out``; the PID is recorded before anything else happens."""
        log = (self.root / "log" / f"{name}.out").open("w")
        process = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.leftovers.add("pids", process.pid)
        self.processes.append(process)

    def start_munge(self) -> None:
        # Its own key, and a link named lrmunged: a script looking for the host's munged by
        # name (pgrep -x munged) does not take this one for it.
        munge = self.root / "munge"
        munge.chmod(0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (munge / "lrmunged").symlink_to(shutil.which("munged"))
        self.spawn("munged", [str(munge / "lrmunged"), "--foreground", "--force",
                              f"--socket={self.munge_socket}", f"--key-file={key}",
                              f"--pid-file={munge / 'munged.pid'}",
                              f"--log-file={munge / 'munged.log'}",
                              f"--seed-file={munge / 'munged.seed'}"])  # fmt: skip
        self.wait_for(self.munge_socket.exists, 10, "munged's socket")

    def start(self) -> SlurmCluster:
        """Install Slurm if needed, start every daemon and wait until all nodes are idle; on any
        failure everything started is stopped again."""
        install()
        Leftovers.remove_orphans()
        try:
            self.make_network()
            self.write_conf()
            self.start_munge()
            self.spawn("slurmctld", [*self.prefix("controller"), "slurmctld", "-D", "-i",
                                     "-f", str(self.conf)])  # fmt: skip
            for name, _ in self.nodes():
                self.spawn(f"slurmd.{name}", [*self.prefix(name), "slurmd", "-D", "-N", name,
                                              "-f", str(self.conf)])  # fmt: skip
            self.wait_for(self._all_idle, 60, "the nodes to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _all_idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return len(states) == len(self.nodes()) and all(s == "idle" for s in states)

    def wait_for(self, predicate, timeout: float, what: str):
        """``predicate()``'s first true value, polled each second for ``timeout`` seconds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if value := predicate():
                return value
            time.sleep(0.5)
        logs = "".join(p.read_text()[-600:] for p in sorted((self.root / "log").glob("*")))
        raise RuntimeError(f"timed out waiting for {what}; daemon logs end:\n{logs}")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            args, env=self.env, capture_output=True, text=True, check=check, timeout=30
        )

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def release_requeued(self, job_id: str) -> None:
        """Let requeued job ``job_id`` start as soon as resources allow: Slurm holds a requeued
        job back for two minutes (pending, reason BeginTime)."""
        self.wait_for(lambda: self.job_state(job_id) == "PENDING", 120, f"job {job_id} requeued")
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")

    def stop(self) -> None:
        """Cancel every job, stop the daemons and undo what ``make_network`` made."""
        if self.munge_socket.exists():
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env,
                           capture_output=True, timeout=30)  # fmt: skip
            time.sleep(1.0)
        self.leftovers.remove()
        for process in self.processes:
            process.poll()  # reap the daemons that had already exited

"""A two-node Slurm cluster emulated on this machine (needs root): nodes ``node1`` and ``node2``
are each a network namespace (a veth pair on a private bridge, an address in a private /24, no
route anywhere else) with their own UTS and mount namespaces (hostname, and a private hosts
file bound over /etc/hosts inside them only), each running a slurmd; slurmctld runs on the
bridge address as ``lrctl``. Names on the host carry a per-cluster tag, so that clusters of
concurrent test runs never collide."""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shlex
import subprocess
from pathlib import Path

from cluster import SlurmCluster

NODES = ("node1", "node2")
CONTROLLER = "lrctl"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no address or route of this machine overlaps."""
    shown = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"],
                           capture_output=True, text=True, check=True, timeout=10)  # fmt: skip
    used = [
        ipaddress.ip_network(route["dst"], strict=False)
        for route in json.loads(shown.stdout or "[]")
        if route.get("dst", "default") != "default" and ":" not in route["dst"]
    ]
    for _ in range(100):
        x, y = secrets.randbelow(190) + 64, secrets.randbelow(256)
        subnet = ipaddress.ip_network(f"10.{x}.{y}.0/24")
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 for the test cluster")


class TwoNodeCluster(SlurmCluster):
    """slurmctld on the bridge address and a slurmd in each node's namespaces; the bridge
    ``lr<tag>br``, host-side veth ends ``lr<tag>v1``/``v2``, namespaces ``lr<tag>-node1``/``2``.

    ``ip netns exec`` would remount /sys, hiding /sys/fs/cgroup from slurmd: daemons enter a
    node's network namespace with ``nsenter`` instead. Everything below runs in place (nsenter,
    unshare and sh exec), so a daemon's PID is that of the process started."""

    name = "lrtwo"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.short = secrets.token_hex(3)  # interface names have at most 15 characters
        self.subnet = free_subnet()
        hosts = list(self.subnet.hosts())
        self.bridge_address = str(hosts[0])
        self.addresses = {node: str(hosts[9 + i]) for i, node in enumerate(NODES, start=1)}

    def netns(self, node: str) -> str:
        return f"lr{self.short}-{node}"

    def controller(self) -> tuple[str, str]:
        return CONTROLLER, self.bridge_address

    def nodes(self) -> list[tuple[str, str]]:
        return list(self.addresses.items())

    def make_network(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the two-node test cluster needs root (network namespaces)")
        bridge = f"lr{self.short}br"
        self.leftovers.add("links", bridge)
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{self.bridge_address}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, (node, address) in enumerate(self.addresses.items(), start=1):
            netns, veth = self.netns(node), f"lr{self.short}v{i}"
            self.leftovers.add("netns", netns)
            self.leftovers.add("links", veth)
            ip("netns", "add", netns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            ip("link", "set", veth, "master", bridge, "up")
            ip("-n", netns, "link", "set", "lo", "up")
            ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", netns, "link", "set", "eth0", "up")
        names = [(self.bridge_address, CONTROLLER), *((a, n) for n, a in self.addresses.items())]
        (self.root / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in names)
        )
        # The only name server is the namespace's own loopback, where nothing listens: a name
        # missing from the hosts file fails at once and no query leaves the machine.
        (self.root / "resolv.conf").write_text(
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
        )

    def prefix(self, host: str) -> list[str]:
        """Into the node's network namespace, then new UTS and mount namespaces with hostname
        ``host`` and the private hosts and resolv.conf bound over /etc's."""
        enter = [] if host == "controller" else ["nsenter", f"--net=/run/netns/{self.netns(host)}"]
        name = CONTROLLER if host == "controller" else host
        script = (
            f"mount --bind {shlex.quote(str(self.root / 'hosts'))} /etc/hosts && "
            f"mount --bind {shlex.quote(str(self.root / 'resolv.conf'))} /etc/resolv.conf && "
            f'hostname {name} && exec "$@"'
        )
        return [*enter, "unshare", "--uts", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh"]  # fmt: skip

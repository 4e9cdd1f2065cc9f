"""Hosts of a cluster on one machine, for tests: each a network namespace with an address of its
own on a bridge, the machine itself (the bridge's address) where they all meet. A process run in
a host sees only that host's network; the file system and the process table are shared."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

IFNAME = "eth0"  # each host's interface, named the same in every namespace
KILL_TIMEOUT_S = 10.0


class NetnsError(RuntimeError):
    """A namespace, bridge or link could not be set up; the message has `ip`'s own."""


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "no `ip` command (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root"
    return None


def ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def _free_subnet(start: int) -> ipaddress.IPv4Network:
    """A 10.231.x.0/24 that no interface of this machine is on (another run's, say)."""
    taken = ip("-o", "-4", "addr", "show") + ip("-4", "route", "show")
    for step in range(256):
        subnet = ipaddress.IPv4Network(f"10.231.{(start + step) % 256}.0/24")
        if f"10.231.{subnet.network_address.packed[2]}." not in taken:
            return subnet
    raise NetnsError("every 10.231.x.0/24 is in use")


@dataclass(frozen=True)
class Host:
    name: str  # the namespace's
    addr: str
    link: str  # its cable: the machine's end of the veth pair, on the bridge

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the host (`ip netns exec` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def pids(self) -> list[int]:
        """Every process whose network is this host's."""
        return [int(pid) for pid in ip("netns", "pids", self.name).split()]

    def unplug(self) -> None:
        """Cut the host off the network: its peers see silence, as after a power cut (no
        connection of its is closed or reset as far as they can tell)."""
        ip("link", "set", self.link, "down")

    def plug(self) -> None:
        ip("link", "set", self.link, "up")

    def kill(self) -> None:
        """SIGKILL every process of the host (what a power cut leaves of it), until none is left."""
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise NetnsError(f"processes of {self.name} outlived SIGKILL: {pids}")
            time.sleep(0.05)


class Network:
    """A bridge on this machine and hosts attached to it, all removed by :meth:`remove`."""

    def __init__(self, tag: str) -> None:
        self.tag = tag  # in every name made here (interface names are at most 15 characters)
        self.bridge = f"stbr{tag}"
        self.subnet = _free_subnet(sum(map(ord, tag)))
        self.gateway = str(self.subnet.network_address + 1)  # the machine's address on the bridge
        self.hosts: list[Host] = []
        self._links: list[str] = []

    def add_bridge(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self) -> Host:
        index = len(self.hosts)
        veth = f"stv{self.tag}x{index}"
        host = Host(f"st{self.tag}-{index}", str(self.subnet.network_address + 2 + index), veth)
        ip("netns", "add", host.name)
        self.hosts.append(host)
        ip("link", "add", veth, "type", "veth", "peer", "name", IFNAME, "netns", host.name)
        self._links.append(veth)
        ip("link", "set", veth, "master", self.bridge)
        host.plug()
        inside = ["netns", "exec", host.name, "ip"]
        ip(*inside, "link", "set", "lo", "up")
        ip(*inside, "addr", "add", f"{host.addr}/{self.subnet.prefixlen}", "dev", IFNAME)
        ip(*inside, "link", "set", IFNAME, "up")
        return host

    def remove(self) -> None:
        """Kill what still runs in the hosts, then delete them and the bridge; every step is
        tried, the first error raised at the end."""
        errors: list[Exception] = []
        for host in self.hosts:
            for step in (host.kill, lambda h=host: ip("netns", "del", h.name)):
                try:
                    step()
                except (NetnsError, subprocess.SubprocessError) as exc:
                    errors.append(exc)
        for link in reversed(self._links):  # a veth went with its peer's namespace
            with contextlib.suppress(NetnsError):
                ip("link", "del", link)
        self.hosts, self._links = [], []
        if errors:
            raise errors[0]


@contextlib.contextmanager
def network(tag: str, hosts: int) -> Iterator[Network]:
    """A bridge and ``hosts`` hosts on it, removed on the way out, whatever happened."""
    net = Network(tag)
    try:
        net.add_bridge()
        for _ in range(hosts):
            net.add_host()
        yield net
    finally:
        net.remove()

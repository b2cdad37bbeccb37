"""Several hosts on one machine: network namespaces with addresses of their own.

Each host is a network namespace (``ip netns``) with one interface, ``eth0``, the inner
end of a veth pair whose outer end is enslaved to a bridge in the root namespace; the
bridge holds the gateway address ``10.77.<n>.1/24`` and host ``i`` has ``10.77.<n>.<10+i>``
(``<n>`` is picked per run among the /24s no interface uses, so two runs never share one).

The machine's Postgres, Redis and the SMTP server of a run listen on 127.0.0.1 only,
which a namespace cannot reach, and their configuration is not ours to change: a
forwarder (``socat``, a process per connection, nothing shared) on the gateway address
relays each port to 127.0.0.1. A host therefore reaches them over its veth and the
bridge, as a worker on another machine would over the network. The forwarder probes
idle connections (TCP keepalive after 5 s, 3 probes 2 s apart) and closes the upstream
side of one whose host is gone, as a server with ``tcp_keepalives_idle`` set would.

Cutting a host sets its ``eth0`` down from inside: its connections stall (nothing is
reset, as when a cable is pulled or a switch port dies) and new ones fail at once
(no route). Restoring it sets ``eth0`` up again; stalled connections resume if neither
side gave up on them meanwhile.

Everything made here (namespaces, veths, the bridge, the forwarders, every process left
in a namespace) is undone by :meth:`HostNetwork.close`, which the context manager calls
whatever ends the block (an exception, Ctrl-C). Names carry the owner's pid, so a run
that was SIGKILLed is cleaned up by the next one (:func:`remove_leftovers`); its
forwarders die with it (``setpriv --pdeathsig``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

#: The /16 the runs take their /24 from.
SUPERNET = "10.77"
#: Every name starts with this and the owner's pid (interface names: 15 characters).
PREFIX = "nh"
_OWNED = re.compile(rf"^{PREFIX}(\d+)(?:h\d+|br|v\d+)$")
#: The forwarder's probes of an idle connection (see the module's docstring).
KEEPALIVE = "keepalive,keepidle=5,keepintvl=2,keepcnt=3"


def unavailable() -> str | None:
    """Why hosts cannot be made here (one line), or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces): run as root"
    for tool in ("ip", "socat"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (apt-get install -y {'iproute2' if tool == 'ip' else tool})"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip() or probe.returncode}"
    return None


def _run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    listed = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def _links() -> list[str]:
    listed = _run("ip", "-o", "link", "show", check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in listed.splitlines()
            if line.count(":") >= 2]


def _kill_namespace_processes(namespace: str) -> list[int]:
    """SIGKILL what still runs in one of our namespaces (workers of a run that died)."""
    pids = [int(p) for p in _run("ip", "netns", "pids", namespace, check=False).stdout.split()
            if p.isdigit()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def remove_leftovers() -> list[str]:
    """Remove the namespaces, veths and bridges of runs whose owner is dead; returns
    what was removed."""
    removed = []
    for namespace in _namespaces():
        match = _OWNED.match(namespace)
        if match and not _alive(int(match.group(1))):
            _kill_namespace_processes(namespace)
            _run("ip", "netns", "del", namespace, check=False)
            removed.append(namespace)
    for link in _links():
        match = _OWNED.match(link)
        if match and not _alive(int(match.group(1))):
            _run("ip", "link", "del", link, check=False)
            removed.append(link)
    return removed


def _free_subnet() -> int:
    """A /24 of ``SUPERNET`` that no interface of the machine has an address in."""
    used = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    taken = {int(m.group(1)) for m in re.finditer(rf"inet {SUPERNET}\.(\d+)\.", used)}
    start = os.getpid() % 250
    for offset in range(250):
        candidate = (start + offset) % 250 + 1
        if candidate not in taken:
            return candidate
    raise RuntimeError(f"no free /24 in {SUPERNET}.0.0/16")


@dataclass
class Host:
    """One host: a namespace, its address, and the root-side end of its veth."""

    name: str
    namespace: str
    address: str
    veth: str
    #: The interface inside the namespace.
    interface: str = "eth0"
    cut: bool = False

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the host (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass
class HostNetwork:
    """``count`` hosts, a bridge, and a forwarder of each of ``ports`` on the gateway."""

    count: int
    ports: Sequence[int]
    hosts: list[Host] = field(default_factory=list)
    gateway: str = ""
    bridge: str = ""
    forwarders: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: Cuts and restores: (host, "cut" | "restored", time.time()).
    events: list[tuple[str, str, float]] = field(default_factory=list)

    def start(self) -> HostNetwork:
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        remove_leftovers()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        owner = f"{PREFIX}{os.getpid()}"
        subnet = _free_subnet()
        network = ipaddress.ip_network(f"{SUPERNET}.{subnet}.0/24")
        self.gateway = f"{SUPERNET}.{subnet}.1"
        self.bridge = f"{owner}br"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/{network.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for number in range(1, self.count + 1):
            host = Host(f"host{number}", f"{owner}h{number}", f"{SUPERNET}.{subnet}.{10 + number}",
                        f"{owner}v{number}")
            self.hosts.append(host)
            _run("ip", "netns", "add", host.namespace)
            _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", host.interface,
                 "netns", host.namespace)
            _run("ip", "link", "set", host.veth, "master", self.bridge, "up")
            _run("ip", "-n", host.namespace, "addr", "add",
                 f"{host.address}/{network.prefixlen}", "dev", host.interface)
            _run("ip", "-n", host.namespace, "link", "set", host.interface, "up")
            _run("ip", "-n", host.namespace, "link", "set", "lo", "up")
        for port in self.ports:
            self.forward(port)
        for host in self.hosts:
            self.wait_reachable(host, self.ports[0] if self.ports else None)

    def forward(self, port: int) -> None:
        """Relay ``gateway:port`` to ``127.0.0.1:port``."""
        pdeathsig = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        self.forwarders[port] = subprocess.Popen(
            [*pdeathsig, "socat", "-lf", "/dev/null",
             f"TCP4-LISTEN:{port},bind={self.gateway},reuseaddr,fork,backlog=1024,{KEEPALIVE}",
             f"TCP4:127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_reachable(self, host: Host, port: int | None, timeout: float = 15.0) -> None:
        """Until ``host`` can open a connection to the gateway's ``port`` (the forwarder
        listens and the link is up), else RuntimeError."""
        if port is None:
            return
        probe = ("import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])),"
                 " timeout=1).close()")
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(
                host.command(["python3", "-c", probe, self.gateway, str(port)]),
                capture_output=True, text=True, timeout=10,
            )
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host.name} cannot reach {self.gateway}:{port}:"
                                   f" {result.stderr.strip().splitlines()[-1:]}")
            time.sleep(0.2)

    def host(self, name: str) -> Host:
        return next(host for host in self.hosts if host.name == name)

    def cut(self, host: Host) -> None:
        """Take the host off the network: its ``eth0`` down, from its side."""
        _run("ip", "-n", host.namespace, "link", "set", host.interface, "down")
        host.cut = True
        self.events.append((host.name, "cut", time.time()))

    def restore(self, host: Host) -> None:
        """Put the host back on the network and wait until it reaches the gateway."""
        _run("ip", "-n", host.namespace, "link", "set", host.interface, "up")
        host.cut = False
        self.wait_reachable(host, self.ports[0] if self.ports else None)
        self.events.append((host.name, "restored", time.time()))

    def processes_in(self, host: Host) -> list[int]:
        out = _run("ip", "netns", "pids", host.namespace, check=False).stdout
        return [int(pid) for pid in out.split() if pid.isdigit()]

    def close(self) -> list[str]:
        """Undo everything; every step is tried whatever the others did. Returns the
        problems met (empty: all clean)."""
        problems = []
        for port, process in self.forwarders.items():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            # socat's per-connection children share its process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            del port
        self.forwarders.clear()
        for host in self.hosts:
            left = _kill_namespace_processes(host.namespace)
            if left:
                problems.append(f"{host.name}: killed {len(left)} leftover process(es)")
            result = _run("ip", "netns", "del", host.namespace, check=False)
            if result.returncode != 0 and host.namespace in _namespaces():
                problems.append(f"{host.name}: {result.stderr.strip()}")
            _run("ip", "link", "del", host.veth, check=False)  # gone with its peer, normally
        self.hosts.clear()
        if self.bridge:
            _run("ip", "link", "del", self.bridge, check=False)
            if self.bridge in _links():
                problems.append(f"bridge {self.bridge} still there")
            self.bridge = ""
        return problems

    def __enter__(self) -> HostNetwork:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

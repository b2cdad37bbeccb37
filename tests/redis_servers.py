"""Real Redis topologies for tests: a master with a replica watched by a Sentinel, and a
three-master Redis Cluster, each of ``redis-server`` processes on free ports in a
temporary directory, stopped (and the directory removed) when the fixture ends.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

from chaos.faults import free_port
from tests.workers import wait_for

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
MASTER_NAME = "notifier-test"


@dataclass
class Servers:
    """``redis-server`` processes of one topology, and their directory."""

    directory: Path
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, port: int, *options: str, config: str | None = None) -> int:
        """A server on ``port`` (``--sentinel`` with ``config``), answering PING."""
        workdir = self.directory / str(port)
        workdir.mkdir()
        args = [REDIS_SERVER]
        if config is not None:
            (workdir / "sentinel.conf").write_text(config)
            args += [str(workdir / "sentinel.conf"), "--sentinel"]
        args += ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                 "--save", "", "--appendonly", "no", "--daemonize", "no",
                 "--logfile", str(workdir / "log"), *options]
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
        client = self.client(port)
        wait_for(lambda: _answers(client), 20, f"redis-server on port {port}")
        return port

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@dataclass
class SentinelTopology:
    servers: Servers
    master: int
    replica: int
    sentinel: int

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel}/0"

    def master_port(self) -> int:
        """The master's port as the Sentinel names it now."""
        _, port = self.servers.client(self.sentinel).sentinel_get_master_addr_by_name(
            MASTER_NAME)
        return int(port)

    def failover(self) -> int:
        """``SENTINEL FAILOVER``, returned once the replica is the master the Sentinel
        names and the old master follows it; the new master's port."""
        old = self.master_port()
        new = self.replica if old == self.master else self.master
        self.servers.client(self.sentinel).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_for(lambda: self.master_port() == new, 30, "the Sentinel to name the replica")
        wait_for(lambda: _role(self.servers.client(new)) == "master", 30, "a promoted replica")
        wait_for(lambda: _role(self.servers.client(old)) == "slave", 30,
                 "the old master to follow")
        return new


def _role(client: redis.Redis) -> str:
    return str(client.info("replication")["role"])


@contextmanager
def sentinel_topology() -> Iterator[SentinelTopology]:
    """A master, its replica (in sync) and one Sentinel that knows both."""
    servers = Servers(Path(tempfile.mkdtemp(prefix="notifier-sentinel-")))
    try:
        master = servers.start(free_port(6390))
        replica = servers.start(free_port(master + 1), "--replicaof", "127.0.0.1", str(master))
        wait_for(lambda: servers.client(replica).info("replication").get("master_link_status")
                 == "up", 30, "the replica to sync")
        sentinel = servers.start(free_port(26390), config=(
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 1\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 2000\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        ))
        topology = SentinelTopology(servers, master, replica, sentinel)
        wait_for(lambda: _sentinel_knows_replica(topology), 30, "the Sentinel to see the replica")
        yield topology
    finally:
        servers.stop()


def _sentinel_knows_replica(topology: SentinelTopology) -> bool:
    replicas = topology.servers.client(topology.sentinel).sentinel_slaves(MASTER_NAME)
    return any(int(r["port"]) in (topology.master, topology.replica)
               and r.get("master-link-status") == "ok" for r in replicas)


@dataclass
class ClusterTopology:
    servers: Servers
    ports: list[int]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def flush(self) -> None:
        for port in self.ports:
            self.servers.client(port).flushall()


@contextmanager
def cluster_topology() -> Iterator[ClusterTopology]:
    """Three masters, every slot covered (``redis-cli --cluster create``)."""
    servers = Servers(Path(tempfile.mkdtemp(prefix="notifier-cluster-")))
    try:
        ports: list[int] = []
        for _ in range(3):
            ports.append(servers.start(
                free_port((ports[-1] + 1) if ports else 6420), "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000",
            ))
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )
        wait_for(lambda: all(servers.client(p).cluster("info")["cluster_state"] == "ok"
                             for p in ports), 30, "the cluster to cover every slot")
        yield ClusterTopology(servers, ports)
    finally:
        servers.stop()

"""``hosts``: the same load on 1, 2 and 4 worker hosts, each a network namespace.

Each host (``chaos.network``: its own address, reaching Postgres and Redis over its veth
through the forwarder on the bridge) runs one worker on every queue, as ``make worker``
does (``-c 2``), so each also runs a flush loop; host 1 runs beat. A producer process in
the root namespace sends ``count`` notifications with ``notify_many`` to ``recipients``
recipients, in-app only, of a type folded into digests (``chaos/rules.toml``:
``chaos_digest``, 3 s or 5 items), and the run ends when every notification is stored,
every window flushed and every delivery sent.

Figures per host count:

* **ingest throughput**: notifications stored per second, from the first publish to
  the last one stored;
* **flush lag**: window due → window flushed (its row deleted in the flush's
  transaction), per window, from a statement trigger installed for the run (Postgres's
  clock on both ends);
* **who did the work**: windows flushed and notifications stored per host (nothing
  must serialise on one host);
* **CPU per notification** (ms): every process in the hosts (workers, pools, flush
  loops, beat), the Postgres backends of the run's database, the forwarders, and the
  producer, read from /proc. On a 2-core machine the absolute rates cannot grow with
  hosts; what must hold is that CPU per notification stays flat.

Its own database (``notifier_bench_hosts``) and Redis db (14), whatever ``python -m
bench`` uses: its triggers never touch the other scenarios' tables. Needs root; ``python
-m bench.hosts`` runs it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
import redis

from bench.config import REPO_ROOT, RESULTS_DIR
from bench.cpu import proc_stat
from bench.series import summary
from chaos.config import RULES_FILE
from chaos.network import unavailable

if TYPE_CHECKING:
    from bench.scenarios import Bench, Outcome

DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/notifier_bench_hosts"
BROKER_URL = "redis://127.0.0.1:6379/14"
HOST_COUNTS = (1, 2, 4)
#: Keeps the db from looking free to a test run between two runs (tests/conftest.py).
CLAIM_KEY = "notifier-bench-hosts-claim"
#: Seconds the idle hosts' CPU is measured before the load (their fixed cost per second:
#: consumers, flush loops polling, heartbeats), to tell it from the cost per notification.
IDLE_SECONDS = 5.0
_STORED = re.compile(r"stored (\d+) notifications")
_DELIVER_TASK = re.compile(r"Task notifier\.deliver\[[^\]]+\] received")
TABLES = ("notifications, deliveries, digests, dead_letters, idempotency_keys, recipients,"
          " inbox_messages, aggregation_windows")


@dataclass(frozen=True)
class HostsConfig:
    database_url: str = DATABASE_URL
    broker_url: str = BROKER_URL
    count: int = 20_000
    #: Few enough that windows close at 5 items, whatever the rate (same windows for
    #: every host count).
    recipients: int = 200
    host_counts: tuple[int, ...] = HOST_COUNTS
    concurrency: int = 2
    timeout: float = 240.0
    seed: int = 20261207

    @property
    def libpq_url(self) -> str:
        return "postgresql://" + self.database_url.split("://", 1)[1]

    def environment(self) -> dict[str, str]:
        """The workers', beat's and the producer's environment (the root namespace's
        addresses: the hosts get the gateway's instead)."""
        pythonpath = os.pathsep.join(
            part for part in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if part)
        return {**os.environ, "NOTIFIER_DATABASE_URL": self.database_url,
                # 100 per message: the load spreads over the hosts' consumers evenly.
                "NOTIFIER_CLIENT_CHUNK_SIZE": "100",
                "NOTIFIER_BROKER_URL": self.broker_url, "NOTIFIER_RULES_FILE": str(RULES_FILE),
                "NOTIFIER_RATE_LIMIT_PER_MINUTE": "0", "NOTIFIER_RATE_LIMIT_PER_HOUR": "0",
                "NOTIFIER_RATE_LIMIT_PER_DAY": "0", "PYTHONPATH": pythonpath}


# --- CPU from /proc -------------------------------------------------------------------


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _group_members(groups: set[int]) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat and stat[1] in groups:
                found.append(int(entry.name))
    return found


@dataclass
class CpuParties:
    """The processes of each party, found afresh at each snapshot."""

    network: Any
    libpq_url: str
    producer_pid: int | None = None

    def pids(self) -> dict[str, list[int]]:
        hosts = [pid for host in self.network.hosts for pid in self.network.processes_in(host)]
        loops = [pid for pid in hosts if b"flush_loop" in _cmdline(pid)]
        with psycopg.connect(self.libpq_url, autocommit=True) as conn:
            backends = [row[0] for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid()")]
        forwarders = _group_members({p.pid for p in self.network.forwarders.values()})
        parties = {"workers": [pid for pid in hosts if pid not in loops], "flush_loops": loops,
                   "postgres": backends, "forwarders": forwarders}
        if self.producer_pid:
            parties["producer"] = [self.producer_pid]
        return parties

    def snapshot(self) -> dict[str, dict[int, float]]:
        taken: dict[str, dict[int, float]] = {}
        for party, pids in self.pids().items():
            taken[party] = {}
            for pid in pids:
                stat = proc_stat(pid)
                if stat:
                    taken[party][pid] = stat[2]
        return taken


def cpu_spent(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
              ) -> dict[str, float]:
    """CPU seconds per party between two snapshots (a process born meanwhile counts whole;
    one that exited meanwhile is missed)."""
    return {party: round(sum(spent - before.get(party, {}).get(pid, 0.0)
                             for pid, spent in pids.items()), 2)
            for party, pids in after.items()}


# --- one run --------------------------------------------------------------------------

_PRODUCER = """
import json, sys, time
from notifier.client import notify_many
payloads = json.load(sys.stdin)
print(time.time(), flush=True)
notify_many(payloads)
print(time.time(), flush=True)
"""


def payloads(config: HostsConfig) -> list[dict[str, Any]]:
    rng = random.Random(config.seed)
    return [{"recipient": f"hosts-r{rng.randrange(config.recipients)}", "type": "chaos_digest",
             "title": f"item {i}", "channels": ["inapp"], "data": {"i": i}}
            for i in range(config.count)]


def reset(config: HostsConfig) -> None:
    with psycopg.connect(config.libpq_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} CASCADE")
    client = redis.Redis.from_url(config.broker_url)
    try:
        with client.pipeline(transaction=True) as atomic:  # never empty: see CLAIM_KEY
            atomic.flushdb()
            atomic.set(CLAIM_KEY, "bench", ex=3600)
            atomic.execute()
    finally:
        client.close()


def _transactions(libpq_url: str, timeout: float = 30.0) -> int:
    """Transactions of the run's database so far (committed and rolled back), read
    once no session but ours is connected to it: a backend reports what it did when it
    ends, so the count is complete only then. Asked over a connection to the server's
    ``postgres`` database, which adds nothing to the count."""
    server, _, database = libpq_url.rpartition("/")
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _scalar(
                admin, "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", database) > 1:
            time.sleep(0.2)
        time.sleep(0.5)  # the last one's report lands as it exits
        return _scalar(admin, "SELECT xact_commit + xact_rollback FROM pg_stat_database"
                              " WHERE datname = %s", database)


def _scalar(conn: psycopg.Connection[Any], sql: str, *params: Any) -> int:
    row = conn.execute(sql, params or None).fetchone()
    return int(row[0]) if row else 0


def run_hosts(config: HostsConfig, hosts: int) -> dict[str, Any]:
    """One run on ``hosts`` hosts; returns its figures."""
    from chaos.hosts import (
        drop_triggers,
        install_triggers,
        over_network,
        start_beat,
        start_worker,
    )
    from chaos.network import HostNetwork
    from notifier.worker.queues import ALL_QUEUES

    reset(config)
    env = config.environment()
    items = payloads(config)
    _, ports = over_network(env, "0.0.0.0")
    processes: list[Any] = []
    with HostNetwork(hosts, ports) as network, \
            psycopg.connect(config.libpq_url, autocommit=True) as conn:
        install_triggers(conn, tables=("aggregation_windows",))
        transactions = _transactions(config.libpq_url)
        try:
            host_env, _ = over_network(env, network.gateway)
            for host in network.hosts:
                metrics = tempfile.mkdtemp(prefix=f"bench-{host.name}-metrics-")
                processes.append((host.name, start_worker(
                    host.command, {**host_env, "NOTIFIER_METRICS_DIR": metrics,
                                   "PGOPTIONS": f"-c notifier.host={host.name}"},
                    f"worker@{host.name}", ALL_QUEUES, config.concurrency)))
            first = network.hosts[0]
            processes.append(("beat", start_beat(first.command, host_env, "bench-beat")))
            figures = _measure(config, hosts, network, conn, items)
        finally:
            for _, process in processes:
                process.stop()
            drop_triggers(conn)
        transactions = (_transactions(config.libpq_url) - transactions
                        - figures["our_queries"])
        figures["transactions"] = transactions
        figures["transactions_per_100"] = round(transactions * 100 / config.count, 1)
        workers = [(name, process.log()) for name, process in processes if name != "beat"]
        figures["stored_per_host"] = {
            name: sum(int(n) for n in _STORED.findall(log)) for name, log in workers}
        figures["ingest_batches"] = sum(len(_STORED.findall(log)) for _, log in workers)
        figures["deliver_tasks"] = sum(len(_DELIVER_TASK.findall(log)) for _, log in workers)
        for _, process in processes:
            process.log_path.unlink(missing_ok=True)
    return figures


def _measure(config: HostsConfig, hosts: int, network: Any, conn: psycopg.Connection[Any],
             items: list[dict[str, Any]]) -> dict[str, Any]:
    parties = CpuParties(network, config.libpq_url)
    idle_before = parties.snapshot()
    time.sleep(IDLE_SECONDS)  # what the hosts spend doing nothing: measured, not waited on
    idle = cpu_spent(idle_before, parties.snapshot())
    producer = subprocess.Popen([sys.executable, "-c", _PRODUCER], cwd=REPO_ROOT,
                                env=config.environment(), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    parties.producer_pid = producer.pid
    assert producer.stdin is not None and producer.stdout is not None
    producer.stdin.write(json.dumps(items))
    producer.stdin.close()
    began = float(producer.stdout.readline())  # imports and payloads read: not counted
    before = parties.snapshot()
    deadline = time.monotonic() + config.timeout
    stored_at = None
    polls = 0  # our own queries: each is a transaction of the database too
    while time.monotonic() < deadline:
        polls += 1
        stored = _scalar(conn, "SELECT count(*) FROM notifications")
        if stored_at is None and stored >= config.count:
            stored_at = time.time()
        if stored_at is not None:
            polls += 1
            if not _scalar(conn, "SELECT (SELECT count(*) FROM aggregation_windows) +"
                                 " (SELECT count(*) FROM deliveries WHERE status <> 'sent')"):
                break
        time.sleep(0.1)
    done_at = time.time()
    sent_at = float(producer.stdout.readline() or "nan")
    after = parties.snapshot()
    _, status, usage = os.wait4(producer.pid, 0)  # its CPU, read as it is reaped
    producer.returncode = os.waitstatus_to_exitcode(status)
    after["producer"] = {producer.pid: usage.ru_utime + usage.ru_stime}
    if stored_at is None:
        raise RuntimeError(f"{hosts} host(s): not all {config.count:,} stored in"
                           f" {config.timeout:g} s")
    lags = [float(row[0]) for row in conn.execute(
        "SELECT extract(epoch FROM at - due_at) * 1000 FROM chaos_host_events"
        " WHERE kind = 'window' ORDER BY 1")]
    windows = Counter(dict(conn.execute(
        "SELECT host, count(*) FROM chaos_host_events WHERE kind = 'window' GROUP BY host"
    ).fetchall()))
    cpu = cpu_spent(before, after)
    total = sum(cpu.values())
    seconds = done_at - began
    idle_rate = {party: spent / IDLE_SECONDS for party, spent in idle.items()}
    busy = total - sum(idle_rate.values()) * seconds
    return {
        "hosts": hosts, "notifications": config.count,
        "publish_seconds": round(sent_at - began, 2),
        "ingest_seconds": round(stored_at - began, 2),
        "ingest_rate": round(config.count / (stored_at - began)),
        "all_done_seconds": round(done_at - began, 2),
        "flush_lag_ms": summary(lags),
        "windows": len(lags),
        "windows_per_host": dict(sorted(windows.items())),
        "digests": _scalar(conn, "SELECT count(*) FROM digests"),
        "our_queries": polls + 6,
        # One transaction per flushed chunk.
        "flush_chunks": _scalar(conn, "SELECT count(DISTINCT tx) FROM chaos_host_events"
                                      " WHERE kind = 'window'"),
        "cpu_seconds": cpu,
        "cpu_ms_per_notification": {party: round(seconds * 1000 / config.count, 3)
                                    for party, seconds in cpu.items()}
        | {"total": round(total * 1000 / config.count, 3),
           "total_less_idle": round(busy * 1000 / config.count, 3)},
        "idle_cpu_cores": {party: round(rate, 3) for party, rate in idle_rate.items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def run_all(config: HostsConfig) -> list[dict[str, Any]]:
    from notifier.storage.migrate import upgrade

    upgrade(config.database_url)
    results = []
    for hosts in config.host_counts:
        print(f"[bench] hosts: {hosts} host(s) ...", file=sys.stderr, flush=True)
        figures = run_hosts(config, hosts)
        print(f"[bench] hosts: {hosts} host(s): {figures['ingest_rate']:,}/s stored,"
              f" flush p99 {figures['flush_lag_ms']['p99']} ms, CPU"
              f" {figures['cpu_ms_per_notification']['total']} ms/notification",
              file=sys.stderr, flush=True)
        results.append(figures)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """The figures as a Markdown table."""
    lines = ["| hosts | stored/s | flush p50 / p99 ms | windows per host | stored per host"
             " | CPU ms/notification: workers, flush loops, postgres, forwarders, producer,"
             " total | less idle | idle cores | transactions per 100 notifications |"
             " ingest batches, flush chunks, deliver tasks |",
             "|---:|---:|---:|---|---|---|---:|---:|---:|---|"]
    for r in results:
        cpu = r["cpu_ms_per_notification"]
        lines.append(
            f"| {r['hosts']} | {r['ingest_rate']:,} | {r['flush_lag_ms']['p50']} /"
            f" {r['flush_lag_ms']['p99']} | {_shares(r['windows_per_host'])}"
            f" | {_shares(r.get('stored_per_host', {}))} | {cpu.get('workers')},"
            f" {cpu.get('flush_loops')}, {cpu.get('postgres')}, {cpu.get('forwarders')},"
            f" {cpu.get('producer')}, **{cpu['total']}** | {cpu['total_less_idle']}"
            f" | {sum(r['idle_cpu_cores'].values()):.2f} | {r['transactions_per_100']}"
            f" | {r.get('ingest_batches', '?')}, {r['flush_chunks']},"
            f" {r.get('deliver_tasks', '?')} |")
    return "\n".join(lines)


def _shares(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{name} {count:,} ({count / total:.0%})" for name, count in counts.items())


def hosts_scaling(bench: Bench, config: HostsConfig | None = None) -> Outcome:
    """The scenario as ``python -m bench`` runs it (``--only hosts``)."""
    from bench.scenarios import Outcome

    config = config or HostsConfig()
    results = run_all(config)
    write_results(results)
    last = results[-1]
    return Outcome(
        "hosts", f"{config.count:,} notifications on {', '.join(map(str, config.host_counts))}"
        " worker hosts (network namespaces)", config.count, last["ingest_seconds"],
        last["publish_seconds"], config.count,
        extra={"runs": results, "table": table(results)},
    )


def write_results(results: list[dict[str, Any]]) -> Path:
    """``bench/results/hosts.json`` (every figure) and ``hosts.md`` (the table)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / "hosts.json"
    path.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                "cpus": os.cpu_count(), "runs": results}, indent=2))
    (RESULTS_DIR / "hosts.md").write_text(table(results) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    defaults = HostsConfig()
    parser = argparse.ArgumentParser(prog="python -m bench.hosts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=defaults.count)
    parser.add_argument("--recipients", type=int, default=defaults.recipients)
    parser.add_argument("--hosts", type=int, nargs="+", default=list(defaults.host_counts))
    parser.add_argument("--database-url", default=defaults.database_url)
    parser.add_argument("--broker-url", default=defaults.broker_url)
    args = parser.parse_args(argv)
    why = unavailable()
    if why:
        print(f"bench hosts: {why}", file=sys.stderr)
        return 2
    config = HostsConfig(database_url=args.database_url, broker_url=args.broker_url,
                         count=args.count, recipients=args.recipients,
                         host_counts=tuple(args.hosts))
    os.environ.update({k: v for k, v in config.environment().items()
                       if k.startswith("NOTIFIER_")})
    results = run_all(config)
    path = write_results(results)
    print(table(results))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["HostsConfig", "hosts_scaling", "main", "run_all", "run_hosts", "table",
           "unavailable"]

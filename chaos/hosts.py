"""The ``hosts`` scenario: several worker hosts and two beats, one host cut off and back.

Each host (``chaos.network``: a network namespace with an address of its own) runs what
a worker machine runs: an ingest worker and a delivery worker (whose flush loop flushes
windows, and which runs beat's sweeps). ``beats`` hosts also run a beat, all at once, as
a fleet does when two machines were both told to run beat. Every host reaches Redis,
Postgres and the SMTP server over its veth (the forwarder on the bridge), never over
loopback.

While the traffic flows, host 1 (a worker pair and a beat) is cut off (its interface
down) for ``host_cut`` seconds, longer than the broker's visibility timeout and the
delivery sweeper's timeouts, so the other hosts take over what it held; then it comes
back with its stale claims and half-done batches. The ledger (``chaos.ledger``) then
accounts for every notification as the other scenarios do.

Who did what is recorded in Postgres itself, for this scenario only: each host's
connections carry its name (``PGOPTIONS=-c notifier.host=<host>``), and statement
triggers on the pipeline's tables (installed at start, dropped at stop) write one row
per event into ``chaos_host_events``: a notification stored, a window flushed (its
``due_at`` and the flush's time: the flush lag), a delivery recorded sent. From those
and the processes' logs come the figures: work per host before, during and after the
cut, windows flushed by more than one host (must be none), deliveries recorded sent by
two hosts (must be none), and what each beat sent and each host ran of it.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from chaos.network import HostNetwork, unavailable
from chaos.pipeline import BeatProcess, Pipeline, Process
from notifier.worker.queues import DELIVERY_QUEUES, INGEST_QUEUES
from tests.workers import CELERY, ROOT, WorkerProcess

if TYPE_CHECKING:
    from chaos.scenarios import Run
    from chaos.traffic import Producer

__all__ = ["HostPipeline", "cut_host", "unavailable"]

#: The variables holding an address a host must reach over the network.
ADDRESS_VARIABLES = ("NOTIFIER_DATABASE_URL", "NOTIFIER_BROKER_URL", "NOTIFIER_REDIS_URL",
                     "NOTIFIER_CHANNELS__EMAIL")
_LOOPBACK = {"127.0.0.1", "localhost"}
_DEFAULT_PORTS = {"postgresql": 5432, "postgresql+psycopg": 5432, "redis": 6379,
                  "smtp": 25, "amqp": 5672}

EVENTS_TABLE = "chaos_host_events"
#: One statement trigger per event kind: (trigger, table, event, transition tables, rows).
_TRIGGERS = (
    ("chaos_host_stored", "notifications", "INSERT", "NEW TABLE AS n",
     "SELECT 'stored', {host}, n.id, NULL FROM n"),
    ("chaos_host_flushed", "aggregation_windows", "DELETE", "OLD TABLE AS o",
     "SELECT 'window', {host}, o.id, o.due_at FROM o"),
    ("chaos_host_sent", "deliveries", "UPDATE", "OLD TABLE AS o NEW TABLE AS n",
     "SELECT 'sent', {host}, n.id, NULL FROM n JOIN o USING (id)"
     " WHERE n.status = 'sent' AND o.status IS DISTINCT FROM 'sent'"),
)
_HOST = "coalesce(nullif(current_setting('notifier.host', true), ''), 'local')"


def install_triggers(conn: psycopg.Connection[Any], tables: tuple[str, ...] | None = None) -> None:
    """Create (or empty) the events table and install the triggers (on ``tables`` only,
    if given: the benchmark counts flushed windows alone)."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS {EVENTS_TABLE} (kind text NOT NULL,"
                 " host text NOT NULL, id uuid NOT NULL, due_at timestamptz,"
                 " at timestamptz NOT NULL DEFAULT clock_timestamp(),"
                 " tx bigint NOT NULL DEFAULT txid_current())")
    conn.execute(f"ALTER TABLE {EVENTS_TABLE} ADD COLUMN IF NOT EXISTS"
                 " tx bigint NOT NULL DEFAULT txid_current()")  # tables of older runs
    conn.execute(f"TRUNCATE {EVENTS_TABLE}")
    for name, table, event, transitions, rows in _TRIGGERS:
        if tables is not None and table not in tables:
            continue
        conn.execute(
            f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
            f" BEGIN INSERT INTO {EVENTS_TABLE} (kind, host, id, due_at)"
            f" {rows.format(host=_HOST)}; RETURN NULL; END $$")
        conn.execute(f"CREATE OR REPLACE TRIGGER {name} AFTER {event} ON {table}"
                     f" REFERENCING {transitions} FOR EACH STATEMENT EXECUTE FUNCTION {name}()")


def drop_triggers(conn: psycopg.Connection[Any]) -> None:
    """Remove the triggers (the events stay for the figures)."""
    for name, table, *_ in _TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
        conn.execute(f"DROP FUNCTION IF EXISTS {name}()")


def over_network(env: dict[str, str], gateway: str) -> tuple[dict[str, str], list[int]]:
    """``env`` with every loopback address of ``ADDRESS_VARIABLES`` replaced by the
    gateway's, and the ports the forwarder must relay."""
    changed, ports = dict(env), []
    for name in ADDRESS_VARIABLES:
        value = env.get(name)
        if not value:
            continue
        parts = urlsplit(value)
        if parts.hostname not in _LOOPBACK:
            continue
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        if port is None:
            raise ValueError(f"{name}: no port in {parts.scheme}:// to forward")
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (f"{userinfo}@" if userinfo else "") + f"{gateway}:{port}"
        changed[name] = urlunsplit(parts._replace(netloc=netloc))
        ports.append(port)
    return changed, sorted(set(ports))


@dataclass
class HostPipeline(Pipeline):
    """The chaos pipeline on ``hosts`` hosts with ``beats`` beats (on hosts 1, 2, …)."""

    hosts: int = 3
    beats: int = 2
    network: HostNetwork | None = None
    #: Per host: its metrics directory (each host has its own /tmp).
    metrics_dirs: dict[str, str] = field(default_factory=dict)
    #: Problems met while tearing the network down (empty: clean).
    teardown: list[str] = field(default_factory=list)
    #: Hosts whose clock is off, and by how much (libfaketime's ``FAKETIME``: "+2s").
    clocks: dict[str, str] = field(default_factory=dict)
    #: More ``-c name=value`` for every host's Postgres sessions (libpq's PGOPTIONS), e.g.
    #: ``-c idle_in_transaction_session_timeout=5s``: session settings, the server's
    #: configuration is left alone.
    pg_options: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        names = [f"host{n}" for n in range(1, self.hosts + 1)]
        self.roles = (*(f"{host}-{kind}" for host in names for kind in ("ingest", "deliver")),
                      *(f"{names[k % self.hosts]}-beat{k + 1}" for k in range(self.beats)))

    def start(self) -> HostPipeline:
        probe = self.env  # the gateway is known once the network stands
        _, ports = over_network(probe, "0.0.0.0")
        self.network = HostNetwork(self.hosts, ports)
        try:
            self.network.start()
            with psycopg.connect(_libpq(self.env["NOTIFIER_DATABASE_URL"]),
                                 autocommit=True) as conn:
                install_triggers(conn)
            super().start()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self, role: str) -> Process:
        assert self.network is not None
        host_name, kind = role.split("-", 1)
        host = self.network.host(host_name)
        env, _ = over_network(self.env, self.network.gateway)
        metrics = self.metrics_dirs.setdefault(
            host_name, tempfile.mkdtemp(prefix=f"chaos-{host_name}-metrics-"))
        env.update({"PGOPTIONS": f"-c notifier.host={host_name} {self.pg_options}".strip(),
                    "NOTIFIER_METRICS_DIR": metrics})
        if host_name in self.clocks and not kind.startswith("beat"):
            # Workers only: under libfaketime beat's sleep fails (EINVAL) and it exits.
            env.update(skewed_clock(self.clocks[host_name]))
        if kind.startswith("beat"):
            return start_beat(host.command, env, f"{kind}-{host_name}")
        if kind == "ingest":
            return start_worker(host.command, env, f"ingest@{host_name}", INGEST_QUEUES,
                                 self.ingest_concurrency)
        return start_worker(host.command, env, f"deliver@{host_name}", DELIVERY_QUEUES,
                             self.deliver_concurrency, "--prefetch-multiplier", "1")

    def stop(self) -> None:
        # A host still cut off (Ctrl-C during the cut) comes back first: its workers
        # then stop warm in seconds, instead of each waiting out its stop timeout.
        network = self.network
        for host in network.hosts if network is not None else []:
            if host.cut and network is not None:
                try:
                    network.restore(host)
                except (RuntimeError, subprocess.SubprocessError) as exc:
                    self.teardown.append(f"could not restore {host.name}: {exc}")
        super().stop()
        url = _libpq(self.env["NOTIFIER_DATABASE_URL"])
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                drop_triggers(conn)
        except psycopg.Error as exc:
            self.teardown.append(f"could not drop the triggers: {exc}")
        if self.network is not None:
            self.teardown += self.network.close()

    def figures(self, db: Any) -> dict[str, Any]:
        """Work per host (from the events table and the logs), and notes."""
        return host_figures(self, db)


#: libfaketime (Debian's ``faketime`` package), preloaded into a host's processes.
FAKETIME_LIBRARY = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"


def skewed_clock(offset: str) -> dict[str, str]:
    """The environment that sets a host's wall clock ``offset`` off (e.g. "+2s"): a
    fleet's clocks disagree by that much when NTP is off or slow to correct."""
    if not Path(FAKETIME_LIBRARY).exists():
        raise RuntimeError(f"a skewed clock needs libfaketime ({FAKETIME_LIBRARY}):"
                           " apt-get install -y faketime")
    return {"LD_PRELOAD": FAKETIME_LIBRARY, "FAKETIME": offset,
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def _libpq(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return "postgresql://" + rest if scheme.startswith("postgres") else url


def start_worker(wrap: Any, env: dict[str, str], node: str, queues: tuple[str, ...],
                  concurrency: int, *extra: str) -> WorkerProcess:
    """``celery worker`` inside a host, as ``tests.workers.WorkerProcess.start`` does."""
    log_fd, log_name = tempfile.mkstemp(prefix=f"{node.replace('@', '-')}-", suffix=".log")
    command = [CELERY, "-A", "notifier", "worker", "-c", str(concurrency), "-l", "info",
               "--without-mingle", "--without-gossip", "-n", node, "-Q", ",".join(queues),
               *extra]
    process = subprocess.Popen(wrap(command), cwd=ROOT, stdout=log_fd,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    os.close(log_fd)
    worker = WorkerProcess(process, Path(log_name))
    worker.wait_for_log("ready.", timeout=60)
    return worker


def start_beat(wrap: Any, env: dict[str, str], name: str) -> BeatProcess:
    log_fd, log_name = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
    schedule = tempfile.mktemp(prefix=f"chaos-{name}-schedule-")
    process = subprocess.Popen(
        wrap([CELERY, "-A", "notifier", "beat", "-l", "info", "--schedule", schedule]),
        cwd=ROOT, stdout=log_fd, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    os.close(log_fd)
    beat = BeatProcess(process, Path(log_name), schedule)
    beat.wait_for_log("beat: Starting", timeout=60)
    return beat


# --- the fault ------------------------------------------------------------------------


def cut_host(run: Run, producer: Producer) -> None:
    """Cut host 1 off the network for ``host_cut`` seconds while traffic flows, then
    put it back."""
    pipeline = run.pipeline
    assert isinstance(pipeline, HostPipeline) and pipeline.network is not None
    network = pipeline.network
    host = network.hosts[0]
    producer.wait_accepted(run.config.scale * 2 // 5, timeout=120)
    started = time.time()
    network.cut(host)
    run.mark("host cut off", host=host.name, started=started)
    time.sleep(run.config.host_cut)  # the outage itself: its length is the fault
    began = time.monotonic()
    network.restore(host)
    run.mark("host back", host=host.name, reachable_after_s=round(time.monotonic() - began, 2),
             cut_for_s=round(time.time() - started, 1))


# --- who did what ---------------------------------------------------------------------

_TASK_RECEIVED = re.compile(r"Task (notifier\.\w+)\[[^\]]+\] received")
_BEAT_SENT = re.compile(r"Scheduler: Sending due task \S+ \((notifier\.\w+)\)")
_LOOP_TOTAL = re.compile(r"flush loop stopped \(pid \d+\), having flushed (\d+) windows")


def _phase(at: float, cut: float | None, back: float | None) -> str:
    """When ``at`` was, against the cut: before, during or after."""
    if cut is None or at < cut:
        return "before"
    return "during" if back is None or at < back else "after"


def host_figures(pipeline: HostPipeline, db: Any) -> dict[str, Any]:
    network_events = pipeline.network.events if pipeline.network else []
    cut = next((at for _, what, at in network_events if what == "cut"), None)
    back = next((at for _, what, at in network_events if what == "restored"), None)
    rows = db.execute(
        f"SELECT kind, host, extract(epoch FROM at), count(*) OVER (PARTITION BY kind, id)"
        f" FROM {EVENTS_TABLE}").fetchall()
    per_host: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    repeated: Counter[str] = Counter()
    for kind, host, at, times in rows:
        per_host[host][kind][_phase(float(at), cut, back)] += 1
        if times > 1:
            repeated[kind] += 1
    lags: dict[str, list[float]] = defaultdict(list)
    by_host: dict[str, list[float]] = defaultdict(list)
    for lag, at, host in db.execute(
            f"SELECT extract(epoch FROM at - due_at) * 1000, extract(epoch FROM at), host"
            f" FROM {EVENTS_TABLE} WHERE kind = 'window' ORDER BY 1"):
        lags["all"].append(float(lag))
        lags[_phase(float(at), cut, back)].append(float(lag))
        by_host[host].append(float(lag))
    stored_at = [float(row[0]) for row in db.execute(
        f"SELECT extract(epoch FROM at) FROM {EVENTS_TABLE} WHERE kind = 'stored' ORDER BY 1")]
    gaps = [(b - a, a) for a, b in itertools.pairwise(stored_at) if cut is None or a >= cut]
    longest_gap = max(gaps, default=(0.0, 0.0))
    beats: dict[str, Counter[str]] = defaultdict(Counter)
    ran: dict[str, Counter[str]] = defaultdict(Counter)
    loops: Counter[str] = Counter()
    for role, process in pipeline.history:
        text = process.log()
        host = role.split("-", 1)[0]
        if "beat" in role:
            beats[role].update(_BEAT_SENT.findall(text))
        else:
            ran[host].update(_TASK_RECEIVED.findall(text))
            loops[host] += sum(int(n) for n in _LOOP_TOTAL.findall(text))
    housekeeping = ("notifier.flush_windows", "notifier.sweep_deliveries", "notifier.heartbeat")
    sent_by_beats = Counter[str]()
    for counts in beats.values():
        sent_by_beats.update(counts)
    ran_total = Counter[str]()
    for counts in ran.values():
        ran_total.update({k: v for k, v in counts.items() if k in housekeeping})
    hosts: dict[str, dict[str, Any]] = {
        host: {kind: dict(phases) | {"total": sum(phases.values())}
               for kind, phases in kinds.items()}
        for host, kinds in sorted(per_host.items())
    }
    for host, counts in ran.items():
        hosts.setdefault(host, {})["housekeeping_run"] = {
            k.split(".")[1]: v for k, v in counts.items() if k in housekeeping}
        hosts[host]["flush_loop_logged_windows"] = loops[host]
    from bench.series import summary

    notes = []
    windows = {host: figures.get("window", {}).get("total", 0) for host, figures in hosts.items()}
    if windows:
        notes.append("windows flushed per host: " + ", ".join(
            f"{host} {count:,}" for host, count in windows.items()))
    if len(beats) > 1:
        notes.append(f"{len(beats)} beats sent {sum(sent_by_beats.values()):,} housekeeping"
                     f" messages ({dict(sent_by_beats)}); workers ran {dict(ran_total)}")
    if longest_gap[0] > 2:
        notes.append(f"nothing stored by any host for {longest_gap[0]:.1f} s, from"
                     f" {longest_gap[1] - (cut or longest_gap[1]):.1f} s after the cut")
    if repeated:
        notes.append(f"recorded by more than one event (must be none): {dict(repeated)}")
    if pipeline.teardown:
        notes.append(f"teardown: {pipeline.teardown}")
    return {
        "hosts": hosts,
        "repeated_events": dict(repeated),
        "longest_ingest_gap_s": round(longest_gap[0], 2),
        "pg_options": pipeline.pg_options,
        "flush_lag_ms": {phase: summary(values) for phase, values in lags.items()},
        "flush_lag_ms_by_host": {host: summary(values)
                                 for host, values in sorted(by_host.items())},
        "beats_sent": {role: dict(counts) for role, counts in beats.items()},
        "housekeeping_sent": dict(sent_by_beats),
        "housekeeping_ran": dict(ran_total),
        "network": {"gateway": pipeline.network.gateway if pipeline.network else None,
                    "events": network_events},
        "teardown": pipeline.teardown,
        "notes": notes,
    }

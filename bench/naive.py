"""The naive baseline and the empty task: plain Celery, one message per notification.

``store`` is what a first version of the pipeline would do: one task per notification,
one INSERT and one commit. ``empty`` does nothing but count itself (one Redis INCR, so
the benchmark can tell when all have run): its rate is the ceiling of any design that
sends one message per notification through this broker and worker.

The app keeps Celery's defaults (prefetch multiplier 4, early acks, no task events)
except that only JSON crosses the broker, like the notifier's own app. It runs in a
worker of its own: ``celery -A bench.naive worker -Q bench.naive``.
"""

from __future__ import annotations

import os
from typing import Any

import psycopg
import redis
from celery import Celery
from psycopg.types.json import Jsonb

QUEUE = "bench.naive"
STORE_TASK = "bench.naive.store"
EMPTY_TASK = "bench.naive.empty"
#: Redis key the empty task increments, in the state Redis (the broker's db on Redis).
EMPTY_COUNTER = "bench:empty:done"

_BROKER_URL = os.environ.get("NOTIFIER_BROKER_URL", "redis://127.0.0.1:6379/12")
_STATE_REDIS_URL = os.environ.get("NOTIFIER_REDIS_URL") or _BROKER_URL

app = Celery("bench_naive", broker=_BROKER_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
)

_INSERT = """
    INSERT INTO notifications (id, recipient_id, type, priority, title, body, data, status)
    VALUES (%s, %s, %s, %s, %s, %s, %s, 'pending')
"""

# One connection per pool process, opened on first use: prefork children must not
# share a socket opened by their parent.
_connections: dict[tuple[int, str], Any] = {}


def _connection(kind: str) -> Any:
    key = (os.getpid(), kind)
    if key not in _connections:
        if kind == "postgres":
            url = os.environ["NOTIFIER_DATABASE_URL"].replace("postgresql+psycopg://",
                                                             "postgresql://", 1)
            _connections[key] = psycopg.connect(url)
        else:
            _connections[key] = redis.Redis.from_url(_STATE_REDIS_URL)
    return _connections[key]


@app.task(name=STORE_TASK)
def store(notification: dict[str, Any]) -> None:
    """Insert one notification and commit it: one transaction (and one fsync) each."""
    connection = _connection("postgres")
    with connection.transaction():  # commits at the end, rolls back on error
        connection.execute(_INSERT, (
            notification["id"], notification["recipient"], notification["type"],
            notification.get("priority", "normal"), notification["title"],
            notification.get("body", ""), Jsonb(notification.get("data", {})),
        ))


@app.task(name=EMPTY_TASK)
def empty() -> None:
    """Do nothing but be counted."""
    _connection("redis").incr(EMPTY_COUNTER)

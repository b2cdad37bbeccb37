"""Status callbacks POSTed per second to a local receiver (``make bench``'s
``callbacks`` step).

``count`` notifications with a ``callback_url`` (the bench's minimal HTTP server, one
process) have their e-mail delivery moved to ``sent`` in one statement: the trigger
writes one callback event per delivery in that transaction (its time is reported as
``trigger_ms``, the cost the status writers pay). Then the worker's code without Celery
runs in this process: the callback sweep (``sweep_due_callbacks``) and
``send_callbacks`` per task of ``NOTIFIER_CALLBACK_BATCH_SIZE``, signed, through the
egress guard and the pooled client, the endpoint's circuit asked and recorded, every
outcome written in one statement. The rate is events sent (state ``sent``) per second
of that loop, checked against the requests the server counted.
"""

from __future__ import annotations

import time
import uuid

from bench.delivery import http_server
from bench.scenarios import Bench, Outcome
from notifier.pipeline.callbacks import send_callbacks, sweep_due_callbacks
from notifier.settings import get_settings
from notifier.storage.db import raw_cursor, session_scope
from notifier.storage.state import state_redis


def callbacks_step(bench: Bench, count: int) -> Outcome:
    settings = get_settings().model_copy(update={
        "allow_private_targets": True,  # the receiver is on loopback
        "endpoint_breaker_threshold": 1_000_000,
    })
    with http_server(bench.config) as server:
        url = f"http://127.0.0.1:{server.port}/callbacks"
        trigger_ms = _seed(bench, count, url)
        state = state_redis()
        sent, rounds = 0, 0
        started = time.perf_counter()
        deadline = started + bench.config.timeout_for(count)
        while sent < count and time.perf_counter() < deadline:
            with session_scope() as session:
                tasks = sweep_due_callbacks(raw_cursor(session), settings)
            rounds += 1
            for task in tasks:
                sent += send_callbacks(task.callback_ids, settings, state).sent
            if not tasks:
                time.sleep(0.05)
        seconds = time.perf_counter() - started
        received = server.items
        state.close()
    return Outcome(
        "callbacks", "status callbacks: sweep + send_callbacks in 1 process, 1 receiver",
        count, seconds, seconds, sent,
        extra={"received": received, "sweeps": rounds, "trigger_ms": trigger_ms,
               "batch_size": settings.callback_batch_size},
    )


def _seed(bench: Bench, count: int, url: str) -> float:
    """``count`` notifications with ``url`` and their deliveries in ``sending``, then
    one UPDATE to ``sent`` (the trigger's work); returns that UPDATE's milliseconds."""
    conn = bench.conn
    conn.execute("TRUNCATE notifications, deliveries, callbacks, callback_secrets CASCADE")
    ids = [str(uuid.uuid4()) for _ in range(count)]
    conn.execute("""
        WITH input AS (SELECT d::uuid AS id FROM unnest(%s::text[]) d),
        notes AS (INSERT INTO notifications (id, recipient_id, type, priority, title, status,
                                             callback_url)
                  SELECT id, 'user-0', 'alert', 'normal', 'bench', 'dispatched', %s FROM input)
        INSERT INTO deliveries (id, notification_id, recipient_id, channel, priority, status,
                                callback)
        SELECT id, id, 'user-0', 'email', 'normal', 'sending', true FROM input
    """, (ids, url))
    conn.commit()
    started = time.perf_counter()
    conn.execute("UPDATE deliveries SET status = 'sent', sent_at = now()"
                 " WHERE status = 'sending'")
    conn.commit()
    return round((time.perf_counter() - started) * 1000, 1)

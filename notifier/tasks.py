"""Celery tasks: thin wrappers that hand broker messages to the domain functions."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from notifier import metrics
from notifier.aggregation import flush_due_windows
from notifier.batching import CommittedBatches
from notifier.celery_app import app
from notifier.db import describe_db_error, session_scope
from notifier.delivery import (
    DeliveryTask,
    deliver_batch,
    queue_deliveries,
    sweep_due_deliveries,
)
from notifier.ingest import IngestMessage, IngestResult, Rejection, ingest_batch, write_dead_letters
from notifier.models import Stage
from notifier.retention import purge_expired as purge_expired_rows
from notifier.rules import get_rules
from notifier.schemas import ENQUEUED_AT_HEADER
from notifier.settings import PRIORITIES, get_settings, queue_name
from notifier.state import state_redis

log = logging.getLogger(__name__)

_settings = get_settings()


@app.task(
    name="notifier.ingest",
    base=CommittedBatches,
    flush_items=_settings.ingest_batch_size,
    flush_interval=_settings.ingest_flush_interval,
    acks_late=True,
)
def ingest(requests: Sequence[Any]) -> dict[str, int]:
    """Store the notifications of many messages in one transaction."""
    messages = [_to_ingest_message(request) for request in requests]
    result = store_messages(messages)
    publish_new_deliveries(result.delivery_ids)
    metrics.record_ingest(result.kinds, result.routed, result.rejected,
                          (m.enqueued_at for m in messages), sum(result.kinds.values()))
    if result.stored:
        log.info("stored %d notifications from %d messages: %s", len(result.stored),
                 len(messages), dict(result.routed),
                 extra={"notification_ids": [str(i) for i in result.stored],
                        "task_ids": [m.message_id for m in messages]})
    return result.as_dict()


@app.task(name="notifier.deliver", acks_late=True)
def deliver(channel: str, delivery_ids: list[str]) -> dict[str, int]:
    """Send deliveries of one channel over one connection; publish the short retries."""
    outcome = deliver_batch(channel, delivery_ids, _settings, state_redis())
    publish(outcome.tasks)
    metrics.record_delivery(channel, outcome.as_dict(), outcome.latencies, len(delivery_ids))
    return outcome.as_dict()


@app.task(name="notifier.sweep_deliveries", acks_late=True)
def sweep_deliveries() -> int:
    """Beat's outbox sweep: publish deliveries that are due and not moving."""
    with session_scope() as session:
        tasks = sweep_due_deliveries(_raw_cursor(session), _settings)
    publish(tasks)
    return sum(len(task.delivery_ids) for task in tasks)


@app.task(name="notifier.flush_windows", acks_late=True)
def flush_windows() -> dict[str, int]:
    """Beat's flush: due aggregation windows become digests, a transaction per chunk.

    Loops while chunks come back full, so a burst of due windows is cleared in one tick;
    a second tick running at the same time takes other windows (SKIP LOCKED).
    """
    totals = {"windows": 0, "digests": 0, "notifications": 0}
    while True:
        with session_scope() as session:
            result = flush_due_windows(
                _raw_cursor(session), get_rules(), _settings, datetime.now(UTC)
            )
        publish(result.tasks)
        metrics.record_flush(result.windows, result.digests, result.digested)
        if result.windows:
            log.info("flushed %d windows: %d digests of %d notifications", result.windows,
                     result.digests, result.digested)
        totals["windows"] += result.windows
        totals["digests"] += result.digests
        totals["notifications"] += result.notifications
        if result.windows < _settings.flush_batch_size:
            return totals


def publish_new_deliveries(delivery_ids: Sequence[Any]) -> None:
    """Queue the delivery rows an ingest batch committed (critical notifications).

    If this process dies between the ingest commit and here, the rows stay ``pending``
    and the sweeper publishes them.
    """
    if not delivery_ids:
        return
    with session_scope() as session:
        tasks = queue_deliveries(_raw_cursor(session), delivery_ids, _settings)
    publish(tasks)


def publish(tasks: Sequence[DeliveryTask]) -> None:
    for task in tasks:
        deliver.apply_async(
            (task.channel, task.delivery_ids), queue=task.queue,
            countdown=task.countdown or None,
            argsrepr=f"({task.channel!r}, <{len(task.delivery_ids)} deliveries>)",
        )


def publish_ingest(payloads: Sequence[Any]) -> None:
    """Hand replayed ingest payloads to ``notifier.ingest``, each on its priority's queue."""
    for payload in payloads:
        priority = payload.get("priority") if isinstance(payload, dict) else None
        queue = queue_name(priority if priority in PRIORITIES else "normal")
        ingest.apply_async((payload,), queue=queue, argsrepr="(<replayed dead letter>)")


def _raw_cursor(session: Any) -> Any:
    return session.connection().connection.driver_connection.cursor()


@app.task(name="notifier.purge_expired", acks_late=True)
def purge_expired() -> dict[str, int]:
    """Beat's retention run: every table's expired rows, in bounded batches."""
    purged = purge_expired_rows(_settings)
    if purged:
        log.info("retention purged %s", purged)
    return purged


@app.task(name="notifier.purge_expired_keys", acks_late=True)
def purge_expired_keys() -> dict[str, int]:
    """The name an older beat sends (idempotency keys only, then): now the same run."""
    return purge_expired()


#: Errors about the content of a row: the message that causes one is dead-lettered.
#: (Our bulk statements run on the raw psycopg cursor, so both families can arrive.)
CONTENT_ERRORS = (DataError, IntegrityError, psycopg.DataError, psycopg.IntegrityError)
DATABASE_ERRORS = (DBAPIError, psycopg.Error)


def store_messages(messages: list[IngestMessage]) -> IngestResult:
    """Commit the batch; isolate and dead-letter a message whose content Postgres refuses.

    Any other failure (Postgres away, a schema out of date) is retried with backoff and
    then raised, which means "not committed": the messages go back to the queue.
    """
    try:
        return _commit_with_retries(messages)
    except CONTENT_ERRORS as exc:
        log.error("batch of %d messages refused (%s); storing them one by one",
                  len(messages), describe_db_error(exc))
    total = IngestResult()
    for message in messages:
        try:
            total.add(_commit_with_retries([message]))
        except CONTENT_ERRORS as exc:
            total.add(_dead_letter_message(message, exc))
    return total


def _commit_with_retries(messages: list[IngestMessage]) -> IngestResult:
    attempts = _settings.ingest_commit_attempts
    for attempt in range(1, attempts + 1):
        try:
            with session_scope() as session:
                return ingest_batch(session, messages, _settings)
        except CONTENT_ERRORS:
            raise
        except DATABASE_ERRORS as exc:
            if attempt == attempts:
                raise
            delay = 0.5 * 2 ** (attempt - 1)
            log.warning("ingest commit failed (%s); retrying in %.1fs",
                        describe_db_error(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _dead_letter_message(message: IngestMessage, exc: Exception) -> IngestResult:
    """Park a whole message Postgres refused, with the database's reason."""
    rejection = Rejection(
        dedup_key=f"ingest:{message.message_id}:message",
        reason=f"database refused the message: {describe_db_error(exc)}",
        payload=message.payload, error_class=type(getattr(exc, "orig", None) or exc).__name__,
    )
    with session_scope() as session:
        write_dead_letters(_raw_cursor(session), Stage.INGEST, [rejection])
    return IngestResult(rejected=1)


def _to_ingest_message(request: Any) -> IngestMessage:
    """What one Celery request carried, checked for the shape ``notifier.ingest`` takes."""
    headers = request.request_dict or {}
    stamped = headers.get(ENQUEUED_AT_HEADER)
    enqueued_at = (
        datetime.fromtimestamp(stamped, UTC) if isinstance(stamped, (int, float)) else None
    )
    args, kwargs = request.args, request.kwargs
    if len(args) == 1 and not kwargs:
        return IngestMessage(request.id, args[0], enqueued_at)
    return IngestMessage(
        request.id, {"args": list(args), "kwargs": kwargs}, enqueued_at,
        error="message: notifier.ingest takes one argument, a notification or a list of"
        f" them (got {len(args)} arguments and {len(kwargs)} keyword arguments)",
    )


# --- health: beat's heartbeat -------------------------------------------------------


@app.task(name="notifier.heartbeat", bind=True)
def heartbeat(self: Any) -> None:
    """Beat's heartbeat: record when beat sent it and when a worker ran it (``notifier
    health`` tells a stopped beat from beat ticking with nobody consuming its queue)."""
    from notifier.health import SENT_AT_HEADER, record_heartbeat_run

    record_heartbeat_run(state_redis(), self.request.get(SENT_AT_HEADER), self.request.hostname)


def _stamp_heartbeat(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """In the publishing process (beat): the sending time goes into the message."""
    from notifier.health import stamp_heartbeat

    stamp_heartbeat(headers)


def _heartbeat_published(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """In the publishing process (beat): record the tick, even if no worker runs it."""
    import redis

    from notifier.health import record_heartbeat_published

    try:
        record_heartbeat_published(state_redis(), headers)
    except redis.RedisError as exc:  # never let bookkeeping stop beat
        log.warning("could not record beat's heartbeat: %s", exc)


def _connect_heartbeat_signals() -> None:
    from celery import signals

    signals.before_task_publish.connect(_stamp_heartbeat, sender="notifier.heartbeat",
                                        weak=False)
    signals.after_task_publish.connect(_heartbeat_published, sender="notifier.heartbeat",
                                       weak=False)


_connect_heartbeat_signals()

"""Celery tasks: thin wrappers that hand broker messages to the domain functions."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import Connection
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError

from notifier import broker_topology
from notifier.pipeline.callbacks import CallbackTask, send_callbacks, sweep_due_callbacks
from notifier.pipeline.dead_letters import Rejection, without_payload, write_dead_letters
from notifier.pipeline.delivery import deliver_batch
from notifier.pipeline.ingest import (
    IngestMessage,
    IngestResult,
    describe_exception,
    failed_message,
    ingest_batch,
    message_id_of,
)
from notifier.pipeline.outbox import DeliveryTask, queue_deliveries, sweep_due_deliveries
from notifier.pipeline.retention import purge_expired as purge_expired_rows
from notifier.schemas import ENQUEUED_AT_HEADER
from notifier.settings import PRIORITIES, get_settings, queue_name
from notifier.storage.db import (
    autocommit_cursor,
    describe_db_error,
    pooled_connection,
    raw_cursor,
    session_scope,
)
from notifier.storage.models import Stage
from notifier.storage.state import state_redis
from notifier.worker import metrics, shutdown
from notifier.worker.app import app
from notifier.worker.batch_sizing import delivery_sizer
from notifier.worker.batching import CommittedBatches, RefusedMessage, batch_failed
from notifier.worker.transactions import transaction

log = logging.getLogger(__name__)

_settings = get_settings()
#: Deliveries per task, following each queue's backlog in the broker.
_batch_size = delivery_sizer(_settings)


@app.task(
    name="notifier.ingest",
    base=CommittedBatches,
    flush_items=_settings.ingest_batch_size,
    flush_interval=_settings.ingest_flush_interval,
    acks_late=True,
)
def ingest(requests: Sequence[Any]) -> dict[str, Any]:
    """Store the notifications of many messages in one transaction.

    Never raises: a batch that could not commit answers :func:`batch_failed`, which
    returns its messages to the queue, counted against them unless Postgres was away.
    """
    messages = [_to_ingest_message(request) for request in requests]
    try:
        result = store_messages(messages)
    except Exception as exc:  # the batch goes back; see CommittedBatches
        return batch_failed(exc, database_unavailable(exc))
    _after_commit(result, messages)
    return result.as_dict()


def _after_commit(result: IngestResult, messages: list[IngestMessage]) -> None:
    """Publish, count and log a committed batch. Nothing here may raise: the batch is
    committed, and an exception would return its messages to the queue for ever."""
    try:
        publish(result.delivery_tasks)
    except Exception as exc:  # queued rows whose task is lost: see NOTIFIER_QUEUED_TIMEOUT
        _log(logging.WARNING, "critical deliveries not published: %s", describe_exception(exc))
    try:
        metrics.record_ingest(result.kinds, result.routed, result.rejected,
                              (m.enqueued_at for m in messages), sum(result.kinds.values()))
    except Exception as exc:
        _log(logging.WARNING, "ingest metrics not recorded: %s", describe_exception(exc))
    for key, reason in result.dead_lettered[:_LOGGED_REJECTIONS]:
        _log(logging.WARNING, "rejected %s: %s", key, reason)
    if len(result.dead_lettered) > _LOGGED_REJECTIONS:
        _log(logging.WARNING, "rejected %d more items (see dead_letters)",
             len(result.dead_lettered) - _LOGGED_REJECTIONS)
    if result.stored:
        _log(logging.INFO, "stored %d notifications from %d messages: %s", len(result.stored),
             len(messages), dict(result.routed),
             extra={"notification_ids": [str(i) for i in result.stored],
                    "task_ids": [m.message_id for m in messages]})


#: Rejections logged one by one per batch; the rest are counted in one line.
_LOGGED_REJECTIONS = 20


def _log(level: int, message: str, *args: Any, **kwargs: Any) -> None:
    """Log without ever raising (a filter or handler that fails loses only the line)."""
    with contextlib.suppress(Exception):
        log.log(level, message, *args, **kwargs)


@app.task(name="notifier.deliver", acks_late=True)
def deliver(channel: str, delivery_ids: list[str]) -> dict[str, int]:
    """Send deliveries of one channel over one connection; publish the short retries."""
    outcome = deliver_batch(channel, delivery_ids, _settings, state_redis(),
                            batch_size=_batch_size, stopping=shutdown.requested)
    publish(outcome.tasks)
    metrics.record_delivery(channel, outcome.as_dict(), outcome.latencies, len(delivery_ids),
                            outcome.by_provider, outcome.failovers)
    return outcome.as_dict()


# Beat's housekeeping sends no task events (nor does its flush tick, in flush_loop.py):
# a row every few seconds would bury the ingest and delivery tasks in Flower's list.
@app.task(name="notifier.sweep_deliveries", acks_late=True, send_events=False)
def sweep_deliveries() -> int:
    """Beat's outbox sweep: publish deliveries that are due and not moving."""
    with transaction() as tx:
        tasks = sweep_due_deliveries(tx.cursor, _settings, batch_size=_batch_size)
        tx.after_commit(publish, tasks)
    return sum(len(task.delivery_ids) for task in tasks)


@app.task(name="notifier.sweep_callbacks", acks_late=True, send_events=False)
def sweep_callbacks() -> int:
    """Beat's callback sweep: publish the status callbacks written since the last one,
    and those due again (``notifier.pipeline.callbacks``)."""
    with transaction() as tx:
        tasks = sweep_due_callbacks(tx.cursor, _settings)
        tx.after_commit(publish_callbacks, tasks)
    return sum(len(task.callback_ids) for task in tasks)


@app.task(name="notifier.callbacks", acks_late=True)
def callbacks(callback_ids: list[str]) -> dict[str, int]:
    """POST a batch of status callbacks; what fails waits in Postgres for the sweep."""
    outcome = send_callbacks(callback_ids, _settings, state_redis())
    metrics.record_callbacks(outcome.as_dict())
    for error in outcome.errors:
        _log(logging.INFO, "callback not sent: %s", error)
    return outcome.as_dict()


def publish_callbacks(tasks: Sequence[CallbackTask]) -> None:
    for task in tasks:
        callbacks.apply_async(
            (task.callback_ids,), queue=task.queue,
            argsrepr=f"(<{len(task.callback_ids)} callbacks>)",
            **broker_topology.publish_options(_settings),
        )


def queue_committed_deliveries(
    connection: Connection, delivery_ids: Sequence[Any]
) -> list[DeliveryTask]:
    """Mark the delivery rows an ingest batch committed (critical notifications) queued,
    and return the tasks to publish for them. Never raises.

    It runs on the batch's own connection right after its commit, one statement in its
    own transaction: one round trip, where a transaction of its own on a connection
    checked out again cost four (the pool's check, ``BEGIN`` with the bounds, the
    statement, ``COMMIT``), all while the critical lane's next batch waited. Its rows
    were committed by this process a moment ago, so no lock of another's is waited
    for in practice (a cancel of one of them is the only writer that could hold one).

    Should this fail, or this process die before it, the rows stay ``pending`` and the
    sweeper publishes them; a host cut off from the network after the commit fails
    here too, which is why the rows are not written ``queued`` in the batch's own
    transaction (they would then wait for ``NOTIFIER_QUEUED_TIMEOUT``).
    """
    if not delivery_ids:
        return []
    try:
        return queue_deliveries(autocommit_cursor(connection), delivery_ids, _settings,
                                batch_size=_batch_size)
    except Exception as exc:  # the sweeper publishes pending rows
        _log(logging.WARNING, "critical deliveries left to the sweeper: %s",
             describe_exception(exc))
        return []


def publish(tasks: Sequence[DeliveryTask]) -> None:
    for task in tasks:
        deliver.apply_async(
            (task.channel, task.delivery_ids), queue=task.queue,
            countdown=broker_topology.countdown(task.countdown, _settings),
            argsrepr=f"({task.channel!r}, <{len(task.delivery_ids)} deliveries>)",
            **broker_topology.publish_options(_settings),
        )


def publish_ingest(payloads: Sequence[Any]) -> None:
    """Hand replayed ingest payloads to ``notifier.ingest``, each on its priority's queue."""
    for payload in payloads:
        priority = payload.get("priority") if isinstance(payload, dict) else None
        queue = queue_name(priority if priority in PRIORITIES else "normal")
        ingest.apply_async((payload,), queue=queue, argsrepr="(<replayed dead letter>)")


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
    purged: dict[str, int] = purge_expired()
    return purged


#: SQLSTATE classes that say Postgres (not one message) is the problem: connection,
#: resources, operator intervention, system, transaction rollback (deadlock,
#: serialization), schema or privileges, object in use, read-only, internal error.
_UNAVAILABLE_SQLSTATE_CLASSES = frozenset(
    {"08", "53", "57", "58", "40", "42", "55", "25", "28", "3D", "XX"}
)


def database_unavailable(exc: BaseException) -> bool:
    """Postgres is away or unusable for every message (retry the batch later), as
    opposed to refusing this message's content (dead-letter it)."""
    original = getattr(exc, "orig", None) or exc
    sqlstate = getattr(original, "sqlstate", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES
    return isinstance(exc, (OperationalError, InterfaceError, SQLAlchemyTimeoutError)) or (
        isinstance(original, (psycopg.OperationalError, psycopg.InterfaceError))
    )


def store_messages(messages: list[IngestMessage]) -> IngestResult:
    """Commit the batch; if it fails for any reason but Postgres being away, store the
    messages one by one and dead-letter each that fails alone, with its exception.

    Postgres away (see :func:`database_unavailable`) is retried with backoff and then
    raised, which means "not committed": the messages go back to the queue.
    """
    try:
        return _commit_through_outage(messages)
    except Exception as exc:
        if database_unavailable(exc):
            raise
        if len(messages) == 1:
            return _dead_letter_message(messages[0], exc)
        _log(logging.ERROR, "batch of %d messages failed (%s); storing them one by one",
             len(messages), describe_exception(getattr(exc, "orig", None) or exc))
    total = IngestResult()
    for message in messages:
        try:
            total.add(_commit_through_outage([message]))
        except Exception as exc:
            if database_unavailable(exc):
                raise
            total.add(_dead_letter_message(message, exc))
    return total


def _commit_through_outage(messages: list[IngestMessage]) -> IngestResult:
    """Run the ingest transaction, and run it again (after 0.5 s, 1 s, 2 s...) while
    Postgres is away, so that a failover or a restart costs a pause rather than the
    batch's return to the queue. Not the retry of deliveries (that is
    ``notifier.pipeline.retry``): nothing was sent, the same transaction is repeated.

    The transaction is bounded (``db.bound_transaction``): one that sat idle too long
    (its session ended) or waited too long for a window another worker holds fails
    with an error of Postgres's, not of a message's, so it is repeated here and then
    returned to the queue uncounted, never dead-lettered."""
    attempts = _settings.ingest_commit_attempts
    for attempt in range(1, attempts + 1):
        try:
            with pooled_connection() as connection:
                with session_scope(bounds=_settings, connection=connection) as session:
                    result = ingest_batch(session, messages, _settings)
                result.delivery_tasks = queue_committed_deliveries(
                    connection, result.delivery_ids)
            return result
        except Exception as exc:
            if not database_unavailable(exc) or attempt == attempts:
                raise
            delay = 0.5 * 2 ** (attempt - 1)
            _log(logging.WARNING, "ingest commit failed (%s); retrying in %.1fs",
                 describe_db_error(exc), delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _dead_letter_message(message: IngestMessage, exc: Exception) -> IngestResult:
    """Park a whole message that failed alone, with its exception's class and reason.

    Should even that fail for a reason other than Postgres being away, the dead letter
    is written without the payload (its size and hash are still kept).
    """
    rejection = failed_message(message, exc)
    try:
        return _write_dead_letter(rejection)
    except Exception as second:
        if database_unavailable(second):
            raise
        return _write_dead_letter(without_payload(rejection, describe_exception(second)))


def _write_dead_letter(rejection: Rejection) -> IngestResult:
    with session_scope() as session:
        written = write_dead_letters(raw_cursor(session), Stage.INGEST, [rejection], _settings)
    return IngestResult(rejected=1, dead_lettered=written)


def _to_ingest_message(request: Any) -> IngestMessage:
    """What one Celery request carried, checked for the shape ``notifier.ingest`` takes.

    Total: any header, task id or argument a producer can send gives an IngestMessage
    (one that is dead-lettered whole if it cannot be read).
    """
    try:
        return _read_request(request)
    except Exception as exc:  # a message we cannot read is that message's
        return IngestMessage(
            message_id_of(getattr(request, "id", None)), None,
            error=f"message: could not be read: {describe_exception(exc)}",
            error_class=type(exc).__name__,
        )


def _read_request(request: Any) -> IngestMessage:
    message_id = message_id_of(request.id)
    if isinstance(request, RefusedMessage):
        return IngestMessage(message_id, request.payload, error=request.reason,
                             error_class=request.error_class, original=request.original)
    headers = request.request_dict if isinstance(request.request_dict, dict) else {}
    enqueued_at = enqueued_at_of(headers.get(ENQUEUED_AT_HEADER))
    args, kwargs = request.args, request.kwargs
    if isinstance(args, list | tuple) and len(args) == 1 and not kwargs:
        return IngestMessage(message_id, args[0], enqueued_at)
    count = len(args) if isinstance(args, list | tuple) else 0
    keywords = len(kwargs) if isinstance(kwargs, dict) else 0
    return IngestMessage(
        message_id, {"args": args, "kwargs": kwargs}, enqueued_at,
        error="message: notifier.ingest takes one argument, a notification or a list of"
        f" them (got {count} arguments and {keywords} keyword arguments)",
    )


#: The latest ``notifier_enqueued_at`` taken as a time (year 2242); any later or
#: negative value, or one that is not a number, is ignored.
_LATEST_STAMP = 2.0**33


def enqueued_at_of(stamp: Any) -> datetime | None:
    """The producer's send time from its header, or None for anything but a plausible
    epoch time (a string, NaN, 1e20, a bool...)."""
    if isinstance(stamp, bool) or not isinstance(stamp, int | float):
        return None
    if not 0 <= stamp <= _LATEST_STAMP:  # also False for NaN
        return None
    return datetime.fromtimestamp(stamp, UTC)


# --- health: beat's heartbeat -------------------------------------------------------


@app.task(name="notifier.heartbeat", bind=True, send_events=False)
def heartbeat(self: Any) -> None:
    """Beat's heartbeat: record when beat sent it and when a worker ran it (``notifier
    health`` tells a stopped beat from beat ticking with nobody consuming its queue)."""
    from notifier.worker.heartbeat import SENT_AT_HEADER, record_heartbeat_run

    record_heartbeat_run(state_redis(), self.request.get(SENT_AT_HEADER), self.request.hostname)


def _stamp_heartbeat(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """In the publishing process (beat): the sending time goes into the message, by the
    state Redis's clock, the clock the worker and the health check read too."""
    import redis

    from notifier.storage.state import server_seconds
    from notifier.worker.heartbeat import stamp_heartbeat

    try:
        now: float | None = server_seconds(state_redis())
    except redis.RedisError as exc:  # never let bookkeeping stop beat
        log.warning("could not read the state Redis's clock for beat's heartbeat: %s", exc)
        now = None
    stamp_heartbeat(headers, now)


def _heartbeat_published(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """In the publishing process (beat): record the tick, even if no worker runs it."""
    import redis

    from notifier.worker.heartbeat import record_heartbeat_published

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

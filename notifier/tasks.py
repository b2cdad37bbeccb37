"""Celery tasks: thin wrappers that hand broker messages to the domain functions."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from notifier.batching import CommittedBatches
from notifier.celery_app import app
from notifier.db import describe_db_error, session_scope
from notifier.ingest import IngestMessage, Rejection, ingest_batch, write_dead_letters
from notifier.models import Stage
from notifier.retention import purge_expired_idempotency_keys
from notifier.schemas import ENQUEUED_AT_HEADER
from notifier.settings import get_settings

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
    return store_messages(messages)


@app.task(name="notifier.purge_expired_keys", acks_late=True)
def purge_expired_keys() -> int:
    """Beat's retention step: forget idempotency keys whose window has passed."""
    purged = 0
    while True:
        with session_scope() as session:
            deleted = purge_expired_idempotency_keys(session)
        purged += deleted
        if deleted == 0:
            return purged


#: Errors about the content of a row: the message that causes one is dead-lettered.
#: (Our bulk statements run on the raw psycopg cursor, so both families can arrive.)
CONTENT_ERRORS = (DataError, IntegrityError, psycopg.DataError, psycopg.IntegrityError)
DATABASE_ERRORS = (DBAPIError, psycopg.Error)


def store_messages(messages: list[IngestMessage]) -> dict[str, int]:
    """Commit the batch; isolate and dead-letter a message whose content Postgres refuses.

    Any other failure (Postgres away, a schema out of date) is retried with backoff and
    then raised, which means "not committed": the messages go back to the queue.
    """
    try:
        return _commit_with_retries(messages)
    except CONTENT_ERRORS as exc:
        log.error("batch of %d messages refused (%s); storing them one by one",
                  len(messages), describe_db_error(exc))
    totals: dict[str, int] = {}
    for message in messages:
        try:
            counts = _commit_with_retries([message])
        except CONTENT_ERRORS as exc:
            counts = _dead_letter_message(message, exc)
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    return totals


def _commit_with_retries(messages: list[IngestMessage]) -> dict[str, int]:
    attempts = _settings.ingest_commit_attempts
    for attempt in range(1, attempts + 1):
        try:
            with session_scope() as session:
                result = ingest_batch(session, messages, _settings)
            return result.as_dict()
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


def _dead_letter_message(message: IngestMessage, exc: Exception) -> dict[str, int]:
    """Park a whole message Postgres refused, with the database's reason."""
    rejection = Rejection(
        dedup_key=f"ingest:{message.message_id}:message",
        reason=f"database refused the message: {describe_db_error(exc)}",
        payload=message.payload, error_class=type(getattr(exc, "orig", None) or exc).__name__,
    )
    with session_scope() as session:
        cursor = session.connection().connection.driver_connection.cursor()
        write_dead_letters(cursor, Stage.INGEST, [rejection])
    return {"rejected": 1}


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

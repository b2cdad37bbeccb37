"""Shared by the routing, windows, flush, flush-worker and cancel tests: notifications
ingested and windows flushed on the run's real Postgres, with a clock the tests control
(``ingest_batch(..., now=...)`` opens and extends windows and ``flush_due_windows(...,
now=...)`` closes them, so no test sleeps for a window).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from notifier.ids import uuid7
from notifier.pipeline.flush import FlushResult, flush_due_windows
from notifier.pipeline.ingest import IngestMessage, IngestResult, ingest_batch
from notifier.pipeline.preferences import set_preferences
from notifier.pipeline.rules import BUILTIN_RULES, Rule, Rules
from notifier.settings import get_settings
from notifier.storage.db import session_scope

#: A Tuesday at noon UTC, later than the database's clock: a delivery held until some
#: time after it is still held when the sweeper (which uses Postgres' now()) looks.
T0 = datetime(2031, 1, 14, 12, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


_last_id = 0


def new_id() -> str:
    """A UUIDv7, each one greater than the last: members of one batch sort as made."""
    global _last_id
    _last_id = max(uuid7().int, _last_id + 1)
    return str(uuid.UUID(int=_last_id))


def note(type: str = "alert", recipient: Any = "user-1", **fields: Any) -> dict[str, Any]:
    """A notification with an id of its own (so the test knows it) and a unique title."""
    note_id = new_id()
    return {"id": note_id, "recipient": recipient, "type": type,
            "title": f"{type} {note_id[-6:]}"} | fields


def ingest(
    notes: list[dict[str, Any]], *, now: datetime, rules: Rules | None = None,
    message_id: str | None = None,
) -> IngestResult:
    """One broker message carrying ``notes``, ingested at ``now``."""
    message = IngestMessage(message_id or str(uuid.uuid4()), list(notes))
    with session_scope() as session:
        return ingest_batch(session, [message], rules=rules or BUILTIN_RULES, now=now)


def raw_cursor(session: Any) -> Any:
    return session.connection().connection.driver_connection.cursor()


def flush(now: datetime, rules: Rules = BUILTIN_RULES, limit: int | None = None) -> FlushResult:
    with session_scope() as session:
        return flush_due_windows(raw_cursor(session), rules, get_settings(), now, limit)


def query(sql: str, **params: Any) -> list[Any]:
    with session_scope() as session:
        return list(session.execute(text(sql), params).all())


def status(note_or_id: Any) -> str:
    note_id = note_or_id["id"] if isinstance(note_or_id, dict) else str(note_or_id)
    [(value,)] = query("SELECT status FROM notifications WHERE id = :id", id=note_id)
    return value


def digests() -> list[Any]:
    return query("SELECT * FROM digests ORDER BY window_start, created_at, item_count DESC")


def windows() -> list[Any]:
    return query("SELECT * FROM aggregation_windows ORDER BY opened_at, id")


def ids(notes: list[dict[str, Any]]) -> list[uuid.UUID]:
    return [uuid.UUID(n["id"]) for n in notes]


def with_rules(*extra: Rule) -> Rules:
    """The built-in rules plus (or replaced by) ``extra``."""
    return Rules([*(r for r in BUILTIN_RULES if r.type != "*"), *extra], BUILTIN_RULES.default)


def deliveries_of(note_or_digest_id: Any) -> list[Any]:
    return query(
        "SELECT * FROM deliveries WHERE notification_id = :id OR digest_id = :id ORDER BY channel",
        id=str(note_or_digest_id),
    )


def prefs(recipient: str, **changes: Any) -> None:
    with session_scope() as session:
        set_preferences(session, recipient, changes)

"""Ingest: turn a batch of broker messages into rows, in one transaction.

The worker acknowledges the messages only after :func:`ingest_batch` commits, so every
step here must be safe to run twice for the same messages (a worker killed after the
commit but before the ack gets them again): ids are inserted with ``ON CONFLICT DO
NOTHING``, idempotency keys remember the first id, dead letters carry a dedup key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import postgres, pq
from psycopg.adapt import Dumper
from psycopg.types.json import Jsonb
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from notifier.pipeline.dead_letters import Rejection, cut, jsonb_safe, write_dead_letters
from notifier.pipeline.outbox import DeliveryTask
from notifier.pipeline.routing import (
    RecipientState,
    Routed,
    already_stored,
    dispatch_now,
    recipient_states,
    route_notifications,
)
from notifier.pipeline.rules import Rules, get_rules
from notifier.schemas import (
    Notification,
    NotificationError,
    validate_notification,
    validate_notifications,
)
from notifier.settings import Settings, get_settings
from notifier.storage.db import describe_db_error, raw_cursor, transaction_now
from notifier.storage.models import NotificationStatus, Stage

if TYPE_CHECKING:
    from psycopg import Cursor

log = logging.getLogger(__name__)

_NOTIFICATION_COLUMNS = (
    "id", "recipient_id", "type", "priority", "channels", "title", "body", "data",
    "idempotency_key", "send_at", "status", "enqueued_at", "status_reason", "window_id",
)


@dataclass(frozen=True)
class IngestMessage:
    """One broker message: its id, what it carried, and when the producer sent it."""

    message_id: str
    payload: Any
    enqueued_at: datetime | None = None
    #: Set when the message itself has the wrong shape; the whole message is rejected.
    error: str | None = None
    #: The class named by the whole message's dead letter (with ``error``).
    error_class: str = "MessageError"
    #: Set when ``payload`` is already a bounded stand-in for a message too big to
    #: decode: (bytes, SHA-256) of the original body.
    original: tuple[int, str] | None = None


@dataclass
class Candidate:
    """A notification that passed validation, with the id it will be stored under."""

    notification: Notification
    id: uuid.UUID
    enqueued_at: datetime | None


@dataclass
class IngestResult:
    stored: list[uuid.UUID] = field(default_factory=list)
    repeated_ids: int = 0
    duplicates: int = 0
    rejected: int = 0
    suppressed: int = 0
    delivery_ids: list[uuid.UUID] = field(default_factory=list)
    #: The tasks that carry ``delivery_ids`` once they are queued (after the commit).
    delivery_tasks: list[DeliveryTask] = field(default_factory=list)
    #: Stored notifications per (priority, type), and per routing status: for metrics.
    kinds: Counter[tuple[str, str]] = field(default_factory=Counter)
    routed: Counter[str] = field(default_factory=Counter)
    #: (dedup key, reason) of each dead letter written, logged after the commit.
    dead_lettered: list[tuple[str, str]] = field(default_factory=list)

    def add(self, other: IngestResult) -> None:
        self.stored += other.stored
        self.dead_lettered += other.dead_lettered
        self.repeated_ids += other.repeated_ids
        self.duplicates += other.duplicates
        self.rejected += other.rejected
        self.suppressed += other.suppressed
        self.delivery_ids += other.delivery_ids
        self.delivery_tasks += other.delivery_tasks
        self.kinds.update(other.kinds)
        self.routed.update(other.routed)

    def as_dict(self) -> dict[str, int]:
        return {
            "stored": len(self.stored), "repeated_ids": self.repeated_ids,
            "duplicates": self.duplicates, "rejected": self.rejected,
            "suppressed": self.suppressed,
            "deliveries": len(self.delivery_ids),
        }


def split_messages(
    messages: Sequence[IngestMessage], settings: Settings | None = None,
) -> tuple[list[Candidate], list[Rejection]]:
    """Validate every item; a bad one becomes a rejection and never holds up the rest.

    Any exception while checking one item (not only a validation error) rejects that
    item alone, with the exception's class.
    """
    settings = settings or get_settings()
    candidates: list[Candidate] = []
    rejections: list[Rejection] = []
    for message in messages:
        error = message.error or _too_many_items(message.payload, settings)
        if error:
            rejections.append(Rejection(
                dedup_key=dedup_key(message.message_id, "message"), reason=error,
                payload=message.payload, error_class=message.error_class,
                original=message.original,
            ))
            continue
        items = message.payload if isinstance(message.payload, list) else [message.payload]
        checked = validate_notifications(items)
        for index, raw in enumerate(items):
            try:
                notification = (validate_notification(raw) if checked is None
                                else checked[index])
                note_id = notification["id"] or id_for_unnamed(message.message_id, index)
            except NotificationError as exc:
                rejections.append(Rejection(
                    dedup_key=dedup_key(message.message_id, index), reason=str(exc),
                    payload=raw, type=_type_of(raw),
                ))
                continue
            except Exception as exc:  # one item's bug is that item's alone
                rejections.append(Rejection(
                    dedup_key=dedup_key(message.message_id, index),
                    reason=f"notification: could not be checked: {describe_exception(exc)}",
                    payload=raw, error_class=type(exc).__name__, type=_type_of(raw),
                ))
                continue
            candidates.append(Candidate(notification, note_id, message.enqueued_at))
    return candidates, rejections


def _too_many_items(payload: Any, settings: Settings) -> str | None:
    limit = settings.max_message_notifications
    if isinstance(payload, list) and len(payload) > limit:
        return f"message: holds {len(payload)} notifications, more than the limit of {limit}"
    return None


def message_id_of(value: Any) -> str:
    """A message's task id as text we can store and log, whatever the producer sent:
    JSON for a non-string, lone surrogates and NUL replaced, a SHA-256 if too long."""
    if not isinstance(value, str):
        try:
            value = json.dumps(value, default=repr, sort_keys=True)
        except (ValueError, TypeError, RecursionError):
            value = repr(type(value))
    if len(value) > 255:
        return "sha256:" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return str(jsonb_safe(value))


#: Message ids longer than this (or not printable) are replaced by their SHA-256 in
#: dedup keys, which must fit ``dead_letters.dedup_key`` (255 characters).
_MAX_KEY_ID = 128
_PRINTABLE_ID = re.compile(r"^[\x21-\x7e]*$")


def dedup_key(message_id: str, item: int | str) -> str:
    """The dead letter's key for one item (or ``"message"``) of a message: stable for a
    redelivered message, and always short enough for its column."""
    if len(message_id) > _MAX_KEY_ID or not _PRINTABLE_ID.match(message_id):
        digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()
        return f"ingest:sha256:{digest}:{item}"
    return f"ingest:{message_id}:{item}"


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """``Class: first line of the message``, cut short: safe to store and to log."""
    try:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    except Exception:  # an exception whose str() raises
        text = ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return cut(text, limit)


def failed_message(message: IngestMessage, exc: BaseException) -> Rejection:
    """The rejection of a whole message that could not be stored even alone: the
    database's refusal, or the exception's class and first line."""
    original = getattr(exc, "orig", None) or exc
    database = isinstance(original, (DBAPIError, psycopg.Error))
    return Rejection(
        dedup_key=dedup_key(message.message_id, "message"),
        reason=(f"database refused the message: {describe_db_error(exc)}" if database
                else f"message: could not be stored: {describe_exception(original)}"),
        payload=message.payload, error_class=type(original).__name__,
        original=message.original,
    )


def id_for_unnamed(message_id: str, index: int) -> uuid.UUID:
    """The id of a notification that came without one: the same for a redelivered message.

    Producers using notifier's client always send ids; a foreign producer may not, and
    a fresh random id would store a redelivered message twice.
    """
    return uuid.uuid5(uuid.NAMESPACE_URL, f"notifier:ingest:{message_id}:{index}")


def _type_of(raw: Any) -> str | None:
    value = raw.get("type") if isinstance(raw, dict) else None
    return value[:64] if isinstance(value, str) else None


def ingest_batch(
    session: Session, messages: Sequence[IngestMessage], settings: Settings | None = None,
    *, rules: Rules | None = None, now: datetime | None = None,
) -> IngestResult:
    """Write a batch of messages: validated rows in bulk, bad items as dead letters.

    ``now`` is the clock that opens and extends aggregation windows: Postgres's, read
    once for the batch, so that every host's windows run on one clock (tests set it).
    """
    settings = settings or get_settings()
    candidates, rejections = split_messages(messages, settings)
    cursor = raw_cursor(session)
    now = now or transaction_now(session)
    result = IngestResult(rejected=len(rejections))

    candidates, result.repeated_ids = _first_of_each_id(candidates)
    existing = recipient_states.get(cursor, {c.notification["recipient_id"] for c in candidates})
    # New or changed recipients: routing reads them again (None), else it uses these.
    states = None if upsert_recipients(cursor, candidates, existing=existing.keys()) else existing
    candidates, result.duplicates = claim_idempotency_keys(
        cursor, candidates, timedelta(seconds=settings.dedup_window)
    )
    new, result.stored = route_and_store(cursor, candidates, rules or get_rules(), settings,
                                         now, states)
    dispatched = [(c, routed) for c, routed in new
                  if routed.status == NotificationStatus.DISPATCHED]
    result.delivery_ids = dispatch_now(cursor, dispatched, now, states=states)
    result.kinds.update((c.notification["priority"], c.notification["type"]) for c, _ in new)
    result.routed.update(routed.status for _, routed in new)
    result.suppressed = result.routed["suppressed"]
    result.dead_lettered = write_dead_letters(cursor, Stage.INGEST, rejections, settings)
    return result


def _first_of_each_id(candidates: list[Candidate]) -> tuple[list[Candidate], int]:
    # Keyed by the id's int: a UUID's own hash is computed in Python, each time.
    unique = {c.id.int: c for c in reversed(candidates)}
    if len(unique) == len(candidates):
        return candidates, 0
    first = [c for c in candidates if unique.get(c.id.int) is c]
    return first, len(candidates) - len(first)


def upsert_recipients(
    cursor: Cursor[Any], candidates: Iterable[Candidate], *, existing: Collection[str] = (),
) -> bool:
    """Make sure every recipient exists; inline recipient objects update their row.
    Returns whether any row was written (a recipient new, or given inline).

    Recipients named by id alone and in ``existing`` (read in this transaction) are
    skipped: most batches name only recipients that exist. Rows are locked in id order
    so that concurrent batches cannot deadlock.
    """
    inline: dict[str, dict[str, Any]] = {}
    named: set[str] = set()
    for candidate in candidates:
        recipient = candidate.notification["recipient"]
        if isinstance(recipient, str):
            named.add(recipient)
        else:
            inline[recipient.id] = recipient.model_dump(exclude_unset=True)
    named -= inline.keys()
    named.difference_update(existing)
    if named:
        cursor.execute(
            "INSERT INTO recipients (id) SELECT unnest(%s::text[]) ORDER BY 1"
            " ON CONFLICT (id) DO NOTHING",
            (sorted(named),),
        )
    if inline:
        rows = [inline[key] for key in sorted(inline)]
        cursor.execute(
            """
            INSERT INTO recipients AS r (id, name, email, phone, timezone, locale, addresses)
            SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],
                                 %s::text[], %s::text[], %s::jsonb[])
            ON CONFLICT (id) DO UPDATE SET
                name = coalesce(EXCLUDED.name, r.name),
                email = coalesce(EXCLUDED.email, r.email),
                phone = coalesce(EXCLUDED.phone, r.phone),
                timezone = CASE WHEN EXCLUDED.timezone = 'UTC' THEN r.timezone
                                ELSE EXCLUDED.timezone END,
                locale = coalesce(EXCLUDED.locale, r.locale),
                addresses = r.addresses || EXCLUDED.addresses,
                updated_at = now()
            """,
            (
                [row["id"] for row in rows],
                [row.get("name") for row in rows],
                [row.get("email") for row in rows],
                [row.get("phone") for row in rows],
                [row.get("timezone") or "UTC" for row in rows],
                [row.get("locale") for row in rows],
                [Jsonb(row.get("addresses") or {}) for row in rows],
            ),
        )
    return bool(named or inline)


def claim_idempotency_keys(
    cursor: Cursor[Any], candidates: list[Candidate], window: timedelta
) -> tuple[list[Candidate], int]:
    """Drop candidates whose key was seen within the window; returns (kept, dropped).

    The key row remembers the first notification's id, so a repeat is answered with it
    (``notifier.client.lookup``) and counted. A redelivered message carries the same id
    as the key's row and passes.
    """
    first_by_key: dict[str, Candidate] = {}
    repeats_in_batch: dict[str, int] = {}
    for candidate in candidates:
        key = candidate.notification["idempotency_key"]
        if key is None:
            continue
        if key in first_by_key:
            repeats_in_batch[key] = repeats_in_batch.get(key, 0) + 1
        else:
            first_by_key[key] = candidate
    if not first_by_key:
        return candidates, 0
    keys = sorted(first_by_key)
    cursor.execute(
        """
        INSERT INTO idempotency_keys AS k (key, notification_id, expires_at, duplicates)
        SELECT key, id, now() + %s, duplicates
        FROM unnest(%s::text[], %s::uuid[], %s::int[]) AS u(key, id, duplicates)
        ORDER BY 1
        ON CONFLICT (key) DO UPDATE SET
            notification_id = CASE WHEN k.expires_at <= now() THEN EXCLUDED.notification_id
                                   ELSE k.notification_id END,
            duplicates = CASE WHEN k.expires_at <= now() THEN EXCLUDED.duplicates
                              WHEN k.notification_id = EXCLUDED.notification_id THEN k.duplicates
                              ELSE k.duplicates + 1 + EXCLUDED.duplicates END,
            expires_at = CASE WHEN k.expires_at <= now() THEN EXCLUDED.expires_at
                              ELSE k.expires_at END
        RETURNING key, notification_id
        """,
        (
            window,  # from Postgres's now(), the clock the expiry is compared with
            keys,
            [first_by_key[key].id for key in keys],
            [repeats_in_batch.get(key, 0) for key in keys],
        ),
    )
    owner = dict(cursor.fetchall())
    kept = [
        c for c in candidates
        if c.notification["idempotency_key"] is None
        or (first_by_key[c.notification["idempotency_key"]] is c
            and owner[c.notification["idempotency_key"]] == c.id)
    ]
    dropped = len(candidates) - len(kept)
    if dropped:
        log.info("dropped %d notifications repeating an idempotency key", dropped)
    return kept, dropped


def route_and_store(
    cursor: Cursor[Any], candidates: list[Candidate], rules: Rules, settings: Settings,
    now: datetime, states: dict[str, RecipientState] | None,
) -> tuple[list[tuple[Candidate, Routed]], list[uuid.UUID]]:
    """Route the candidates not stored yet (windows counted) and COPY them; returns the
    ones stored, with their decisions, and their ids.

    All of it runs inside a savepoint, and first as if none were stored: most batches
    hold no id stored before, and a COPY that meets one fails on the primary key (after
    waiting for the transaction storing it, if it is still at work: the same message
    redelivered to a second worker). Then everything since the savepoint is undone, the
    windows' counts too, and done again once, reading which ids are stored now, with
    ``INSERT ... ON CONFLICT DO NOTHING`` in place of the COPY (which nothing can fail).
    """
    if not candidates:
        return [], []
    careful = False
    before: set[uuid.UUID] = set()
    # Never released: the transaction's commit takes it along.
    cursor.execute(f"SAVEPOINT {_SAVEPOINT}")
    while True:
        routes = route_notifications(cursor, candidates, rules, settings, now,
                                     stored=before, states=states)
        new = list(zip(candidates, routes, strict=True))
        if before:
            new = [(c, routed) for c, routed in new if c.id not in before]
        try:
            stored = copy_notifications(cursor, new, careful=careful)
        except psycopg.errors.UniqueViolation:
            if careful:
                raise
            cursor.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
            careful = True
            before = already_stored(cursor, [c.id for c in candidates])
            continue
        if len(stored) < len(new):  # stored meanwhile by another (careful only)
            kept = set(stored)
            new = [(c, routed) for c, routed in new if c.id in kept]
        return new, stored


_SAVEPOINT = "ingest_routing"


def copy_notifications(
    cursor: Cursor[Any], candidates: Sequence[tuple[Candidate, Routed]], *,
    careful: bool = False,
) -> list[uuid.UUID]:
    """COPY the candidates (each with its routing decision) straight into
    ``notifications``; returns the ids stored.

    The caller passes only ids not stored before (``already_stored``, in this
    transaction); COPY fails (UniqueViolation) if another transaction stored one since.
    ``careful``: through a temporary table and ``INSERT ... ON CONFLICT DO NOTHING``
    instead, which stores only the ids no transaction has stored.
    """
    if not candidates:
        return []
    rows = [_notification_row(candidate, routed) for candidate, routed in candidates]
    if careful:
        stored = _insert_new_only(cursor, rows)
    else:
        _copy_rows(cursor, "notifications", rows)
        stored = [candidate.id for candidate, _ in candidates]
    _store_callback_urls(cursor, candidates)
    return stored


def _store_callback_urls(
    cursor: Cursor[Any], candidates: Sequence[tuple[Candidate, Routed]]
) -> None:
    """Write the ``callback_url`` of the few notifications that name one, by a statement
    of their own: the COPY's columns stay as they were, and a batch without any
    callback URL (the usual one) runs nothing more. A candidate another transaction
    stored first (``careful``) is not touched: its own row keeps its own URL, written
    by that transaction."""
    urls = [(c.id, c.notification.get("callback_url")) for c, _ in candidates]
    named = [(i, url) for i, url in urls if url]
    if not named:
        return
    ids, values = zip(*named, strict=True)
    cursor.execute(
        "UPDATE notifications n SET callback_url = u.url"
        " FROM unnest(%s::uuid[], %s::text[]) AS u(id, url)"
        " WHERE n.id = u.id AND n.callback_url IS NULL",
        (list(ids), list(values)),
    )


_COLUMNS = ", ".join(_NOTIFICATION_COLUMNS)
#: The COPY's column types: it goes in Postgres' binary format, which spares Postgres
#: parsing text (uuids, times) and this process writing it. ``data`` arrives as JSON text
#: (``data_json``, encoded once by validation) and is sent as is (see _JsonbText).
_COPY_TYPES = ("uuid", "text", "text", "text", "varchar[]", "text", "text", "jsonb", "text",
               "timestamptz", "text", "timestamptz", "text", "uuid")


class _JsonbText(Dumper):
    """``jsonb`` in binary format from JSON text: a version byte, then the text (psycopg's
    own dumper would encode the text again, as a JSON string)."""

    format = pq.Format.BINARY
    oid = postgres.types["jsonb"].oid

    def dump(self, obj: Any) -> bytes:
        return b"\x01" + str(obj).encode()


def _copy_rows(cursor: Cursor[Any], table: str, rows: list[tuple[Any, ...]]) -> None:
    # Used by oid only (COPY after set_types): no other value of the cursor's changes.
    cursor.adapters.register_dumper(None, _JsonbText)
    with cursor.copy(f"COPY {table} ({_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_COPY_TYPES)
        for row in rows:
            copy.write_row(row)


def _insert_new_only(cursor: Cursor[Any], rows: list[tuple[Any, ...]]) -> list[uuid.UUID]:
    """The rows whose id no transaction has stored, through a temporary table made for
    this transaction and dropped at its end: behind PgBouncer the server connection
    goes to other clients next, so nothing may outlive the transaction (and one left by
    an older notifier, of another shape, is dropped first)."""
    cursor.execute("DROP TABLE IF EXISTS pg_temp.ingest_staging")
    cursor.execute(
        "CREATE TEMP TABLE ingest_staging (LIKE notifications INCLUDING DEFAULTS) ON COMMIT DROP"
    )
    _copy_rows(cursor, "ingest_staging", rows)
    cursor.execute(
        f"INSERT INTO notifications ({_COLUMNS}) SELECT {_COLUMNS} FROM ingest_staging"
        " ORDER BY id ON CONFLICT (id) DO NOTHING RETURNING id"
    )
    return [row[0] for row in cursor.fetchall()]


def _notification_row(candidate: Candidate, routed: Routed) -> tuple[Any, ...]:
    n = candidate.notification
    return (
        candidate.id, n["recipient_id"], n["type"], n["priority"], n["channels"], n["title"],
        n["body"], n["data_json"], n["idempotency_key"], n["send_at"], routed.status,
        candidate.enqueued_at, routed.reason, routed.window_id,
    )

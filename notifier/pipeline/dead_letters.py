"""Dead letters: what could not be stored or delivered, written down with its reason,
found, replayed and purged; the operator's way out of a failure.

A replayed delivery starts over (attempts reset) through the same outbox as any other
delivery, so it is claimed, rate-limited and recorded like the rest. A replayed ingest
rejection is handed to ``notifier.ingest`` again: useful once the cause is fixed (a
channel now configured, a schema migrated). Both are marked ``replayed_at`` so a second
replay of "everything not yet replayed" does not send them twice.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from psycopg.types.json import Jsonb
from sqlalchemy import CursorResult, delete, func, select, text, update
from sqlalchemy.orm import Session

from notifier.channels.base import OutgoingMessage
from notifier.ids import uuid7
from notifier.masking import mask_secrets, mask_structure
from notifier.pipeline.outbox import BatchSize, DeliveryTask, queue_deliveries
from notifier.settings import Settings, get_settings
from notifier.storage.db import raw_cursor
from notifier.storage.models import DeadLetter, Stage

if TYPE_CHECKING:
    from psycopg import Cursor

_SURROGATES = re.compile("[\ud800-\udfff]")


# --- Writing --------------------------------------------------------------------------


@dataclass
class Rejection:
    """What a dead letter records for one bad item of a message."""

    dedup_key: str
    reason: str
    payload: Any
    error_class: str = "NotificationError"
    type: str | None = None
    #: (bytes, SHA-256) of the original when ``payload`` is already a bounded prefix.
    original: tuple[int, str] | None = None


def cut(text: str, limit: int) -> str:
    """``text`` at most ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    keep = max(0, limit - 40)
    return f"{text[:keep]}… ({len(text) - keep} more characters)"


def jsonb_safe(value: Any, depth: int = 0) -> Any:
    """The value as Postgres can hold it: NUL and lone surrogates replaced (U+FFFD), NaN
    and Infinity as strings, anything past 100 levels as its text. A dead letter must
    always be writable, or its whole batch would return to the queue forever."""
    if isinstance(value, str):
        if "\x00" in value or _SURROGATES.search(value):
            return _SURROGATES.sub("\ufffd", value.replace("\x00", "\ufffd"))
        return value
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return repr(value)
    if depth > 100 and isinstance(value, dict | list | tuple):
        return repr(value)[:10_000]
    if isinstance(value, dict):
        return {jsonb_safe(str(k), depth + 1): jsonb_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonb_safe(item, depth + 1) for item in value]
    return value


def bounded_payload(payload: Any, limit: int) -> tuple[str, int, str, bool]:
    """The payload as JSON text for ``dead_letters.payload``, at most ``limit`` bytes of
    it: (jsonb text, full size in bytes, SHA-256 of the full JSON, truncated?).

    A payload over the limit is stored as a JSON string holding its first ``limit``
    bytes, so a huge message costs a bounded row (and the size and hash still identify
    it); replay refuses a truncated one.
    """
    encoded = json.dumps(jsonb_safe(payload), ensure_ascii=False, separators=(",", ":"),
                         default=repr)
    raw = encoded.encode("utf-8", "replace")
    digest = hashlib.sha256(raw).hexdigest()
    if len(raw) <= limit:
        return encoded, len(raw), digest, False
    return json.dumps(raw[:limit].decode("utf-8", "ignore")), len(raw), digest, True


def _dead_letter_row(rejection: Rejection, settings: Settings) -> tuple[Any, ...]:
    if rejection.original is not None:  # already a bounded stand-in for the original
        size, digest = rejection.original
        payload = json.dumps(jsonb_safe(rejection.payload), ensure_ascii=False, default=repr)
        truncated = True
    else:
        payload, size, digest, truncated = bounded_payload(
            rejection.payload, settings.dead_letter_payload_bytes
        )
    key = jsonb_safe(str(rejection.dedup_key))
    if len(key) > 255:
        key = "sha256:" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()
    return (
        key,
        cut(jsonb_safe(str(rejection.reason)), settings.max_reason_chars),
        cut(jsonb_safe(str(rejection.error_class)), 128),
        jsonb_safe(rejection.type)[:64] if isinstance(rejection.type, str) else None,
        payload, size, digest, truncated,
    )


def write_dead_letters(
    cursor: Cursor[Any], stage: Stage, rejections: Sequence[Rejection],
    settings: Settings | None = None,
) -> list[tuple[str, str]]:
    """Park rejected items with their reason; a redelivered message adds no second row.

    Every column is cut to fit and the payload is bounded, so nothing about a rejection
    can make this insert fail (or its whole batch would return to the queue). Nothing
    is logged here, inside the transaction: the (dedup key, reason) pairs are returned
    for the caller to log once the transaction has committed.
    """
    if not rejections:
        return []
    settings = settings or get_settings()
    rows = [_dead_letter_row(rejection, settings) for rejection in rejections]
    columns = list(zip(*rows, strict=True))
    cursor.execute(
        """
        INSERT INTO dead_letters (dedup_key, stage, reason, error_class, type, payload,
                                  payload_bytes, payload_sha256, payload_truncated)
        SELECT k, %s, r, e, t, p, b, h, x
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::jsonb[],
                    %s::bigint[], %s::text[], %s::bool[]) AS u(k, r, e, t, p, b, h, x)
        ON CONFLICT (dedup_key) DO NOTHING
        """,
        (stage.value, *(list(column) for column in columns)),
    )
    return [(row[0], row[1]) for row in rows]


@dataclass(frozen=True)
class FailedDelivery:
    """What a dead letter records for a delivery that gave up."""

    id: uuid.UUID
    channel: str
    recipient_id: str
    priority: str
    attempts: int
    reason: str
    error_class: str
    #: What was being sent; None when no message could be built (no address).
    message: OutgoingMessage | None

    def payload(self) -> dict[str, Any]:
        """The delivery's content as an operator needs it to judge a replay."""
        payload: dict[str, Any] = {
            "delivery_id": str(self.id), "recipient": self.recipient_id,
            "priority": self.priority,
        }
        message = self.message
        if message is not None:
            payload |= {
                "type": message.type, "title": message.title, "body": message.body,
                "data": json.loads(json.dumps(message.data, default=str)),
                "notification_id": (
                    str(message.notification_id) if message.notification_id else None
                ),
                "digest_id": str(message.digest_id) if message.digest_id else None,
            }
        return payload


def write_delivery_dead_letters(cursor: Cursor[Any], failed: Sequence[FailedDelivery]) -> None:
    """Park deliveries that gave up, with their content, in one statement; in the
    caller's transaction, which also marks them dead. Each dead letter of a delivery is
    a row of its own (a replayed delivery that dies again adds one). Texts are made
    storable (``jsonb_safe``): nothing a channel quoted may make the insert fail."""
    if not failed:
        return
    rows = [
        (
            f"deliver:{one.id}:{uuid7()}", jsonb_safe(one.reason), one.error_class, one.channel,
            one.message.type if one.message else None,
            one.message.notification_id if one.message else None, one.id, one.attempts,
            Jsonb(jsonb_safe(one.payload())),
        )
        for one in failed
    ]
    cursor.execute(
        """
        INSERT INTO dead_letters (dedup_key, stage, reason, error_class, channel, type,
            notification_id, delivery_id, attempts, payload)
        SELECT k, %s, r, e, c, t, n, d, a, p
        FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::uuid[],
                    %s::uuid[], %s::int[], %s::jsonb[]) AS u(k, r, e, c, t, n, d, a, p)
        """,
        (Stage.DELIVER.value, *(list(column) for column in zip(*rows, strict=True))),
    )


def without_payload(rejection: Rejection, why: str) -> Rejection:
    """The rejection with its payload replaced by ``why``, the original's size and
    SHA-256 still kept: for a dead letter that could not be written with its payload."""
    _, size, digest, _ = bounded_payload(rejection.payload, 0)
    return replace(rejection, payload=f"payload not kept: {why}",
                   original=rejection.original or (size, digest))


# --- Finding --------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetterFilter:
    stage: str | None = None
    type: str | None = None
    channel: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    #: None: all; False: only those never replayed; True: only replayed ones.
    replayed: bool | None = None
    ids: tuple[int, ...] = ()

    def conditions(self) -> list[Any]:
        """The WHERE clauses of this filter, shared by list, replay and purge."""
        conditions: list[Any] = []
        for column, value in (
            (DeadLetter.stage, self.stage), (DeadLetter.type, self.type),
            (DeadLetter.channel, self.channel),
        ):
            if value:
                conditions.append(column == value)
        if self.since:
            conditions.append(DeadLetter.created_at >= self.since)
        if self.until:
            conditions.append(DeadLetter.created_at < self.until)
        if self.replayed is not None:
            replayed_at = DeadLetter.replayed_at
            conditions.append(
                replayed_at.is_not(None) if self.replayed else replayed_at.is_(None)
            )
        if self.ids:
            conditions.append(DeadLetter.id.in_(self.ids))
        return conditions


def find_dead_letters(
    session: Session, where: DeadLetterFilter, limit: int = 50
) -> list[DeadLetter]:
    query = select(DeadLetter).where(*where.conditions())
    query = query.order_by(DeadLetter.created_at.desc(), DeadLetter.id.desc())
    return list(session.scalars(query.limit(limit)))


def count_dead_letters(session: Session, where: DeadLetterFilter) -> int:
    query = select(func.count()).select_from(DeadLetter).where(*where.conditions())
    return session.scalar(query) or 0


def dead_letter_view(row: DeadLetter) -> dict[str, Any]:
    """A dead letter as `notifier dead-letters list --json`, `show` and the HTTP API show
    it: its payload (a producer's message, with recipients' addresses) and reason with
    every secret hidden, addresses shown as `recipients show` shows them."""
    return {
        "id": row.id, "stage": row.stage, "reason": mask_secrets(row.reason),
        "error_class": row.error_class, "type": row.type and mask_secrets(row.type),
        "channel": row.channel, "notification_id": row.notification_id,
        "delivery_id": row.delivery_id, "attempts": row.attempts,
        "created_at": row.created_at, "replayed_at": row.replayed_at,
        "payload": mask_structure(row.payload),
    }


# --- Replaying and purging ------------------------------------------------------------


@dataclass
class Replay:
    replayed: int = 0
    #: Dead letters whose delivery is no longer dead (sent or replayed since): skipped.
    skipped: int = 0
    #: Dead letters whose delivery row retention has deleted: skipped, nothing to send.
    purged: int = 0
    #: Delivery tasks to publish after the commit.
    tasks: list[DeliveryTask] = field(default_factory=list)
    #: Ingest payloads to hand to ``notifier.ingest`` after the commit.
    ingest_payloads: list[Any] = field(default_factory=list)
    #: One line per dead letter that cannot be replayed (its payload was truncated);
    #: these stay unreplayed.
    refused: list[str] = field(default_factory=list)


def replayable_ids(
    session: Session, where: DeadLetterFilter, chunk: int = 500
) -> Iterator[list[int]]:
    """Ids of matching dead letters not yet replayed, oldest first, in chunks."""
    query = (
        select(DeadLetter.id)
        .where(*where.conditions(), DeadLetter.replayed_at.is_(None))
        .order_by(DeadLetter.id)
    )
    ids = list(session.scalars(query))
    for start in range(0, len(ids), chunk):
        yield ids[start:start + chunk]


def replay_dead_letters(
    session: Session, ids: list[int], settings: Settings, *, batch_size: BatchSize | None = None
) -> Replay:
    """Reset what the dead letters describe and mark them replayed, in one transaction;
    the revived deliveries' tasks (of ``batch_size``) are published after it."""
    rows = list(session.execute(
        select(DeadLetter.id, DeadLetter.stage, DeadLetter.delivery_id, DeadLetter.payload,
               DeadLetter.payload_truncated, DeadLetter.payload_bytes)
        .where(DeadLetter.id.in_(ids), DeadLetter.replayed_at.is_(None))
        .with_for_update(skip_locked=True)
    ))
    replay = Replay()
    truncated = [row for row in rows if row.stage != Stage.DELIVER and row.payload_truncated]
    replay.refused = [
        f"dead letter {row.id}: not replayed: only a prefix of its {row.payload_bytes}-byte"
        " payload was kept" for row in truncated
    ]
    rows = [row for row in rows if not (row.stage != Stage.DELIVER and row.payload_truncated)]
    delivery_ids = [row.delivery_id for row in rows if row.stage == Stage.DELIVER]
    revived = _revive_deliveries(session, delivery_ids)
    cursor = raw_cursor(session)
    replay.tasks = queue_deliveries(cursor, revived, settings, batch_size=batch_size)
    existing = _existing_deliveries(session, delivery_ids)
    for row in rows:
        if row.stage == Stage.DELIVER:
            if row.delivery_id in revived:
                replay.replayed += 1
            elif row.delivery_id in existing:
                replay.skipped += 1
            else:
                replay.purged += 1
        else:
            replay.ingest_payloads.append(row.payload)
            replay.replayed += 1
    session.execute(
        update(DeadLetter).where(DeadLetter.id.in_([row.id for row in rows]))
        .values(replayed_at=func.now())
    )
    return replay


def _existing_deliveries(session: Session, delivery_ids: list[Any]) -> set[Any]:
    """Which of the deliveries still have a row (retention deletes old ones)."""
    if not delivery_ids:
        return set()
    return set(session.scalars(
        text("SELECT id FROM deliveries WHERE id = ANY(:ids)"), {"ids": delivery_ids}
    ))


def _revive_deliveries(session: Session, delivery_ids: list[Any]) -> list[Any]:
    """Dead deliveries back to the outbox with their attempts reset."""
    if not delivery_ids:
        return []
    revived = list(session.execute(
        text("""
        UPDATE deliveries SET status = 'pending', attempts = 0, last_error = NULL,
            next_attempt_at = now(), updated_at = now()
        WHERE id = ANY(:ids) AND status = 'dead'
        RETURNING id, notification_id
        """),
        {"ids": delivery_ids},
    ))
    notification_ids = [row.notification_id for row in revived if row.notification_id]
    if notification_ids:
        session.execute(
            text("UPDATE notifications SET status = 'dispatched', updated_at = clock_timestamp()"
                 " WHERE id = ANY(:ids) AND status = 'failed'"),
            {"ids": notification_ids},
        )
    return [row.id for row in revived]


def purge_dead_letters(session: Session, where: DeadLetterFilter) -> int:
    """Delete the matching dead letters; their deliveries stay recorded as dead."""
    result = session.execute(delete(DeadLetter).where(*where.conditions()))
    return cast("CursorResult[Any]", result).rowcount


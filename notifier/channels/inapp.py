"""The in-app channel: messages land in the recipient's inbox (``inbox_messages``).

A batch is one multi-row insert. The row's id is the delivery's id, so a delivery sent
twice (a retried batch after a crash) stays one inbox message.

Each new message is announced to the live feeds of the API processes
(``notifier.pipeline.inbox_feed``) by ``pg_notify`` in the insert's own transaction:
Postgres delivers it only if the insert commits, after the row is visible, in commit
order, to every process listening, and drops it when none listens. The payload is the
message's id and recipient (``<uuid> <recipient>``, at most 1,057 bytes of the 8,000
NOTIFY allows): a feed reads the row itself, and only for recipients it serves. A retried
delivery already in the inbox inserts nothing and announces nothing.

**Stream order.** A message's ``created_at`` is its place in the recipient's stream
(cursors, ``Last-Event-ID``), so it must grow in commit order per recipient: a reader
that has seen a message must never later find an older one commit. ``now()`` alone is
the transaction's start, and two workers writing for one recipient could commit in the
other order. So a batch first takes a transaction-scoped advisory lock per recipient (in
one order, so two batches never deadlock), and then stamps each row at least one
microsecond after that recipient's newest message: the statement runs after the lock,
so it sees every earlier commit for that recipient. Locks of different recipients never
wait on each other (a hash collision only makes two recipients share one).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence

from sqlalchemy.exc import DBAPIError

from notifier.channels.base import Channel, OutgoingMessage, RetryableError, SendResult
from notifier.storage.db import describe_db_error, raw_cursor, session_scope

#: The NOTIFY channel the in-app channel announces new inbox messages on.
INBOX_CHANNEL = "notifier_inbox"
#: First key of the two-key advisory locks ordering a recipient's inbox writes (the
#: one-key space holds the delivery claims' locks: the two never meet).
_LOCK_SPACE = 0x1B0C5


class InAppChannel(Channel):
    name = "inapp"
    schemes = ("inapp",)

    def send_batch(self, messages: Sequence[OutgoingMessage]) -> Iterator[SendResult]:
        try:
            _insert(messages)
        except DBAPIError as exc:
            error = RetryableError(f"inbox write failed: {describe_db_error(exc)}")
            yield from (SendResult(m.delivery_id, error) for m in messages)
            return
        yield from (SendResult(m.delivery_id) for m in messages)


def recipient_lock_key(recipient_id: str) -> int:
    """The second key of a recipient's advisory lock: 32 bits of its SHA-256 (signed)."""
    return int.from_bytes(hashlib.sha256(recipient_id.encode()).digest()[:4], "big", signed=True)


def parse_announcement(payload: str) -> tuple[uuid.UUID, str] | None:
    """The (message id, recipient) of a payload (``<uuid> <recipient>``, made by the insert
    below); None for anything else on the channel."""
    message_id, _, recipient_id = payload.partition(" ")
    try:
        return uuid.UUID(message_id), recipient_id
    except ValueError:
        return None


def _insert(messages: Sequence[OutgoingMessage]) -> None:
    columns = list(zip(*(
        (m.delivery_id, m.recipient_id, m.notification_id, m.digest_id, m.type, m.priority,
         m.title, m.body, json.dumps(m.data))
        for m in messages
    ), strict=True))
    keys = sorted({recipient_lock_key(m.recipient_id) for m in messages})
    with session_scope() as session:
        cursor = raw_cursor(session)
        cursor.execute(
            "SELECT count(pg_advisory_xact_lock(%s, k)) FROM unnest(%s::int[]) k",
            (_LOCK_SPACE, keys),
        )
        cursor.execute(
            """
            WITH new AS (
                INSERT INTO inbox_messages
                    (id, recipient_id, notification_id, digest_id, type, priority, title,
                     body, data, created_at)
                SELECT r.*, greatest(now(), (
                    SELECT max(m.created_at) + interval '1 microsecond' FROM inbox_messages m
                    WHERE m.recipient_id = r.recipient_id))
                FROM unnest(%s::uuid[], %s::text[], %s::uuid[], %s::uuid[], %s::text[],
                            %s::text[], %s::text[], %s::text[], %s::jsonb[])
                    AS r(id, recipient_id, notification_id, digest_id, type, priority, title,
                         body, data)
                ON CONFLICT (id) DO NOTHING
                RETURNING id, recipient_id
            )
            SELECT count(pg_notify(%s, id::text || ' ' || recipient_id)) FROM new
            """,
            [*(list(column) for column in columns), INBOX_CHANNEL],
        )

"""The in-app channel: messages land in the recipient's inbox (``inbox_messages``).

A batch is one multi-row insert. The row's id is the delivery's id, so a delivery sent
twice (a retried batch after a crash) stays one inbox message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

from sqlalchemy.exc import DBAPIError

from notifier.channels.base import Channel, OutgoingMessage, RetryableError, SendResult
from notifier.storage.db import describe_db_error, raw_cursor, session_scope


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


def _insert(messages: Sequence[OutgoingMessage]) -> None:
    columns = list(zip(*(
        (m.delivery_id, m.recipient_id, m.notification_id, m.digest_id, m.type, m.priority,
         m.title, m.body, json.dumps(m.data))
        for m in messages
    ), strict=True))
    with session_scope() as session:
        cursor = raw_cursor(session)
        cursor.execute(
            """
            INSERT INTO inbox_messages
                (id, recipient_id, notification_id, digest_id, type, priority, title, body,
                 data)
            SELECT * FROM unnest(%s::uuid[], %s::text[], %s::uuid[], %s::uuid[], %s::text[],
                                 %s::text[], %s::text[], %s::text[], %s::jsonb[])
            ON CONFLICT (id) DO NOTHING
            """,
            [list(column) for column in columns],
        )

"""The in-app channel on real Postgres: its announcements (NOTIFY) and the stream order
of ``created_at`` per recipient that cursors and ``Last-Event-ID`` rely on."""

from __future__ import annotations

import threading
import uuid

import psycopg

from notifier.channels.base import OutgoingMessage
from notifier.channels.inapp import (
    _LOCK_SPACE,
    INBOX_CHANNEL,
    InAppChannel,
    parse_announcement,
    recipient_lock_key,
)
from notifier.storage.db import libpq_url
from tests.conftest import DATABASE_URL

CONNINFO = libpq_url(DATABASE_URL)


def outgoing(recipient: str, title: str = "t") -> OutgoingMessage:
    return OutgoingMessage(uuid.uuid4(), recipient, None, "alert", "high", title, "body")


def send(*messages: OutgoingMessage) -> None:
    assert all(result.sent for result in InAppChannel("inapp://").send_batch(messages))


def announcements(conn: psycopg.Connection) -> list[tuple[uuid.UUID, str] | None]:
    return [parse_announcement(n.payload) for n in conn.notifies(timeout=1.0)]


def test_each_new_message_is_announced_once_with_its_id_and_recipient():
    """A batch announces each inserted message; the same batch again (a retried
    delivery) inserts and announces nothing."""
    batch = [outgoing("ann"), outgoing("bob with spaces"), outgoing("ann")]
    with psycopg.connect(CONNINFO, autocommit=True) as listener:
        listener.execute(f"LISTEN {INBOX_CHANNEL}")
        send(*batch)
        got = announcements(listener)
        assert sorted(got, key=str) == sorted(
            ((m.delivery_id, m.recipient_id) for m in batch), key=str)
        send(*batch)
        assert announcements(listener) == []


def test_a_payload_that_is_not_an_announcement_is_ignored():
    assert parse_announcement("hello") is None
    assert parse_announcement("") is None
    assert parse_announcement(f"{uuid.uuid4()} x y") is not None


def _created_at(message_id: uuid.UUID) -> object:
    with psycopg.connect(CONNINFO) as conn:
        return conn.execute("SELECT created_at FROM inbox_messages WHERE id = %s",
                            (message_id,)).fetchone()[0]


def test_a_message_committed_later_is_stamped_after_one_committed_before_it():
    """A writer that started first but commits while a delivery for the same recipient
    waits: the delivery's message comes after it in the stream, though its transaction
    began earlier, so no reader resuming from a cursor can miss either."""
    early = uuid.uuid4()
    with psycopg.connect(CONNINFO) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                      (_LOCK_SPACE, recipient_lock_key("cy")))
        late = outgoing("cy")
        sender = threading.Thread(target=send, args=(late,))
        sender.start()
        sender.join(0.5)
        assert sender.is_alive()  # waiting for the recipient's lock
        other.execute("INSERT INTO inbox_messages (id, recipient_id, type, priority, title,"
                      " body, created_at) VALUES (%s, 'cy', 'a', 'high', 't', 'b',"
                      " now() + interval '1 hour')", (early,))
        other.commit()
    sender.join(10)
    assert _created_at(late.delivery_id) > _created_at(early)


def test_other_recipients_are_not_held_by_one_recipients_lock():
    """A lock held for one recipient delays no delivery to another."""
    with psycopg.connect(CONNINFO) as other:
        other.execute("SELECT pg_advisory_xact_lock(%s, %s)",
                      (_LOCK_SPACE, recipient_lock_key("dee")))
        send(outgoing("eve"))
        other.rollback()
